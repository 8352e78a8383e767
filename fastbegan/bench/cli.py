"""``fastbegan bench``: print the newest results table, or measure a few cases with ``--run``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..model import check_resolution, default_filters
from .device import default_results_dir
from .results import is_results, newest_results, render_markdown
from .runner import run_case
from .schema import VARIANTS
from .session import BenchSession

@click.command("bench")
@click.option("--run", "run_now", is_flag=True, help="Measure now (training step, a few cases) instead "
              "of printing the newest saved table.")
@click.option("--results", "results_dir", type=click.Path(file_okay=False), default=None,
              help="Results folder (default: benchmarks/results, or $FASTBEGAN_BENCH_RESULTS).")
@click.option("--res", "res_list", type=int, multiple=True, help="With --run: resolutions "
              "(default 64 on GPU, 8 on CPU). Repeatable.")
@click.option("--batch-size", type=int, default=None, help="With --run: batch (default 16 on GPU, 4 on CPU).")
@click.option("--filters", type=int, default=None, help="With --run: n (default: the model's default on "
              "GPU, 8 on CPU).")
@click.option("--variants", default="pabe", show_default=True, help="With --run: letters of "
              "p (the port), a, b, c (torch.compile: slow to compile), d (fastbegan, compiled on a CPU), "
              "e (fastbegan without compile); benchmarks/README.md.")
@click.option("--save", is_flag=True, help="With --run: also write <device>-<date>.json/.md into the results folder.")
@click.option("--device", default="auto", show_default=True)
def bench(run_now, results_dir, res_list, batch_size, filters, variants, save, device):
    """Print the newest benchmark table (from `pytest benchmarks/`), or measure a few cases with --run."""
    results = Path(results_dir) if results_dir else default_results_dir()
    if not run_now:
        path = newest_results(results) if results.is_dir() else None
        if path is None or not is_results(path):
            raise click.ClickException(f"no benchmark results in {results}: run `pytest benchmarks/` "
                                       "(or `fastbegan bench --run`)")
        doc = json.loads(path.read_text())
        click.echo(f"{path}\n")
        click.echo(render_markdown(doc["rows"], doc["meta"]))
        return
    from ..train import resolve_device
    dev = resolve_device(device)
    bad = set(variants) - set(VARIANTS)
    if bad or not variants:
        raise click.ClickException(f"--variants takes letters from {''.join(VARIANTS)}, got {variants!r}")
    gpu = dev.type == "cuda"
    res_list = res_list or ((64,) if gpu else (8,))
    b = batch_size or (16 if gpu else 4)
    session = BenchSession.from_env(dev, results_dir=results if save else None, quick=True)
    session.compile_policy = "all" if set("cd") & set(variants) else "none"
    cases = [("matmul_peak", "bf16", dict(n=8192 if gpu else 512))]
    for r in res_list:
        check_resolution(r)
        n = filters or (default_filters(r) if gpu else 8)
        cases += [("train_step", v, dict(res=r, batch=b, filters=n)) for v in variants]
    for wl, v, p in cases:
        row = run_case(wl, v, p, session)
        status = f"{row['ms_median']:.3f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
        click.echo(f"  {wl} {row['case']} ({v}): {status}", err=True)
    if save:
        j, m = session.write(complete=True)
        click.echo(f"wrote {j} and {m}", err=True)
    click.echo(render_markdown(session.rows, dict(session.meta, complete=True,
                                                   elapsed_s=round(session.elapsed(), 1),
                                                   compile_used_s=round(session.compile_used_s, 1))))
