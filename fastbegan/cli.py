"""Command line: ``fastbegan train | sample | prepare | ...`` (click).

User errors (bad data, bad options, a checkpoint of another run) end in one clear line
and exit code 1; ``FASTBEGAN_DEBUG=1`` shows the full traceback instead.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click

from . import research_cli
from .bench.cli import bench
from .doctor import doctor
from .errors import user_errors
from .remedies import (DEFAULT_VARIANT, SW_MAX_SIDE, VARIANT_PRESETS, VARIANT_SUMMARY, resumed_variant_options,
                       variant_flags, variant_options)


def check_writable(folder: str) -> None:
    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise click.ClickException(f"cannot write to output folder {folder!r} ({e.strerror}): "
                                   "choose another --out") from None


def remove_if_empty(folder: str) -> None:
    """Delete ``folder`` if it holds nothing but empty files and folders."""
    import shutil
    p = Path(folder)
    try:
        if p.is_dir() and all(f.is_dir() or f.stat().st_size == 0 for f in p.rglob("*")):
            shutil.rmtree(p)
    except OSError:
        pass


_PACKAGE = Path(__file__).resolve().parent


def _ours(message: str, filename: str) -> bool:
    """A warning fastbegan raised (its messages start with "fastbegan:"; or from its code)."""
    if message.startswith("fastbegan:"):
        return True
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


def show_warnings_as_lines(ctx: click.Context) -> None:
    """For the command's duration, print fastbegan's own warnings as one line on stderr,
    ``fastbegan: <message>``, once per message, like the start-up lines: no source path, no
    line number, no category (``.../step.py:381: UserWarning: ...`` reads like a crash to a
    user). Other libraries' warnings are shown as Python shows them."""
    previous, seen = warnings.showwarning, set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip()
        if not _ours(text, str(filename)):
            return previous(message, category, filename, lineno, file, line)
        if not text.startswith("fastbegan:"):
            text = f"fastbegan: {text}"
        if text not in seen:
            seen.add(text)
            click.echo(text, err=True)

    def restore():
        if warnings.showwarning is show:
            warnings.showwarning = previous
    warnings.showwarning = show
    ctx.call_on_close(restore)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastbegan")
@click.pass_context
def main(ctx):
    """fastbegan: train BEGAN fast, sample from it, and benchmark its fused kernels."""
    show_warnings_as_lines(ctx)


@main.command()
@click.option("--res", type=int, default=64, show_default=True, help="Image resolution: a power of two in 8..256.")
@click.option("--data", type=click.Path(), default=None,
              help="Folder of images (searched recursively) or a .npy from `fastbegan prepare`. "
                   "Default: the embedded procedural faces.")
@click.option("--steps", type=int, default=None,
              help="Total training steps. Default 100000 on a GPU, 300 on CPU (CPU is for trying things out).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--filters", type=int, default=None, help="n, the conv width. Default 128 at res >= 128, else 64.")
@click.option("--z-dim", type=int, default=64, show_default=True)
@click.option("--h", "h", type=int, default=64, show_default=True, help="Embedding size of D's auto-encoder.")
@click.option("--gamma", type=float, default=None,
              help="Diversity ratio (the start of the adapted gamma with --k-target). Default: the variant's "
                   "(the paper's 0.5; match 1.5).")
@click.option("--lambda-k", type=float, default=None,
              help="k_t's learning rate. Default: the variant's (the paper's 0.001; match 0.003).")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--lr-d", type=float, default=None,
              help="D's learning rate, when it differs from G's (TTUR, Heusel et al. 2017: D faster). "
                   "The lr rules (halving, --lr-stall, the divergence guard) keep the ratio. Default: --lr.")
@click.option("--lr-min", type=float, default=2e-5, show_default=True)
@click.option("--lr-half-every", type=int, default=100_000, show_default=True)
@click.option("--lr-stall", type=int, default=0, show_default=True,
              help="Also halve lr when M has not improved for this many steps (0 = off).")
@click.option("--separate-z", is_flag=True, help="Paper-literal separate z_D / z_G (default: one z, as the TF reference).")
@click.option("--variant", type=click.Choice(sorted(VARIANT_PRESETS)), default=None,
              show_default=f"{DEFAULT_VARIANT}; with --resume, the run's own",
              help="began: the paper's BEGAN exactly (the TensorFlow reference's math). "
                   + " ".join(f"{v}: {VARIANT_SUMMARY[v]} ({variant_flags(v)})." for v in ("escape", "settle", "match"))
                   + " The options below override the variant's values. --resume without "
                   "--variant keeps the remedies the run was started with.")
@click.option("--cs-alpha", type=float, default=None,
              help="BEGAN-CS (Chang et al. 2018): add alpha * mean|Enc(G(z)) - z| to D's loss. Needs --h "
                   "equal to --z-dim. 0 = off.")
@click.option("--pt-weight", type=float, default=None,
              help="EBGAN's pulling-away term (Zhao et al. 2017) on D's codes of the fakes, added to G's "
                   "loss with this weight. 0 = off.")
@click.option("--pt-centred/--pt-raw", "pt_centred", default=None,
              help="The pulling-away term on the codes minus their batch mean (a component all codes "
                   "share, large in D's codes, no longer hides their differences). Default: raw codes.")
@click.option("--ms-weight", type=float, default=None,
              help="MSGAN's mode-seeking term (Mao et al. 2019): G pays this weight / (mean|G(z1) - G(z2)| "
                   "/ mean|z1 - z2|), so different z must give different images. 0 = off.")
@click.option("--fm-weight", type=float, default=None,
              help="Feature matching (Salimans et al. 2016) on D's codes: G pays this weight times the gap "
                   "between the batch mean and standard deviation of its samples' codes and the real "
                   "batch's, so G's samples must spread where the reals do. 0 = off.")
@click.option("--fm-pixels/--fm-codes", "fm_pixels", default=None,
              help="Feature matching on the images' pixels (each pixel's batch mean and spread) instead "
                   "of D's codes. Default: codes.")
@click.option("--fm-data/--fm-batch", "fm_data", default=None,
              help="With --fm-pixels: match each pixel's mean and spread over the whole training set "
                   "(computed once at the start, mirror images included with flips) instead of the real "
                   "batch's, a target without the batch's sampling noise. Default: the real batch.")
@click.option("--sw-weight", type=float, default=None,
              help="Sliced Wasserstein distances (Deshpande et al. 2018) between G's batch and the training "
                   "set, on 1x1, 2x2, 4x4 and 8x8 thumbnails along 128 fixed directions each: G pays this "
                   "weight times their mean, so the colours' joint spread (a background's hue, not each "
                   "channel's alone) must match the data's. 0 = off.")
@click.option("--k-init", type=float, default=None,
              help="k_0, the starting k_t (the paper: 0). Above 0, D pushes back on the fakes from the "
                   "first step instead of waiting for k_t to grow.")
@click.option("--k-min", type=float, default=None,
              help="A floor under k_t (the paper: 0): k_t is clipped to [k_min, 1], so D never stops "
                   "pushing back on the fakes.")
@click.option("--k-target", type=float, default=None,
              help="An equilibrium that keeps acting: gamma (starting at --gamma) follows the measured "
                   "L_fake / L_real, offset so that k_t holds near this value instead of drifting onto its "
                   "floor as the ratio rises during training (docs/training.md). 0 = a fixed gamma, the paper's.")
@click.option("--lambda-gamma", type=float, default=0.01, show_default=True,
              help="With --k-target: the rate of gamma's moving average (about 1 / the steps it averages).")
@click.option("--pt-anneal", type=int, nargs=2, default=None, metavar="START END",
              help="Anneal the pulling-away weight linearly to 0 between these steps (ends the escape).")
@click.option("--pt-final", type=float, default=None,
              help="The pulling-away weight --pt-anneal ends at (default 0).")
@click.option("--k-min-anneal", type=int, nargs=2, default=None, metavar="START END",
              help="Anneal the floor under k_t linearly to 0 between these steps.")
@click.option("--ema-decay", type=float, default=None,
              help="Keep an EMA of G's weights with this decay (e.g. 0.999) in the checkpoints; 0 = off.")
@click.option("--skip", is_flag=True, help="Decoder skip connections (h0 concatenated at every level).")
@click.option("--mbstd-group", type=int, default=0, show_default=True, metavar="G",
              help="D's encoder also sees the minibatch standard deviation of its last feature map "
                   "(ProGAN), over groups of G real or G fake samples; G divides the batch. 0 = off.")
@click.option("--sw-max-side", type=int, default=SW_MAX_SIDE, show_default=True, metavar="SIDE",
              help="With --sw-weight: the pyramid's thumbnails go up to SIDE x SIDE (a power of two; "
                   "16 also sees where things sit to a sixteenth of the side).")
@click.option("--augment-shift", type=float, default=0.0, show_default=True, metavar="FRACTION",
              help="Shift every image D sees, real and fake, by its own random offset of up to this "
                   "fraction of the side (edge pixels repeated; differentiable, so G is not asked for "
                   "shifted images): D cannot learn a small training set by heart (DiffAugment's "
                   "translation, e.g. 0.125). 0 = off.")
@click.option("--vanishing-residual", type=int, default=0, show_default=True,
              help="Steps over which the decoder's residual carry goes 1 -> 0 (0 = off).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="bf16: autocast with fp32 master weights, losses and k_t. auto: bf16 on GPUs with "
                   "bf16 tensor cores and CPUs with AMX-BF16 / AVX512-BF16, fp32 elsewhere.")
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), default="runs/began", show_default=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--sample-every", type=int, default=500, show_default=True)
@click.option("--ckpt-every", type=int, default=1000, show_default=True)
@click.option("--log-every", type=int, default=50, show_default=True)
@click.option("--keep-ckpts", type=int, default=3, show_default=True)
@click.option("--max-restores", type=int, default=3, show_default=True,
              help="On a NaN/Inf loss, restore the last good checkpoint with lr halved, at most this often.")
@click.option("--on-collapse", type=click.Choice(["warn", "stop", "restore"]), default="warn", show_default=True,
              help="On a suspected mode collapse: warn; stop (save and stop); restore (go back to the "
                   "last checkpoint before it, with lr halved). See docs/health.md.")
@click.option("--health-patience", type=int, default=200, show_default=True,
              help="Steps a health problem (collapse, k_t stuck at 0/1, M rising) must last before "
                   "it is reported; 0 turns the health monitor off.")
@click.option("--compile", "compile_step", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, is_flag=False, flag_value="on",
              help="torch.compile the fused step's forward (batch conversion, G, D, losses). auto: "
                   "on a GPU always; on a CPU when the run is long enough to win back the compile "
                   "time (decided after a few timed steps; see docs). Plain --compile: on.")
@click.option("--no-compile", is_flag=True, help="Same as --compile off.")
@click.option("--reference-step", is_flag=True,
              help="Train with the reference step (two backward passes, the definition of correctness) "
                   "instead of the fused single-pass step.")
@click.option("--dist-timeout", type=float, default=300.0, show_default=True, metavar="SECONDS",
              help="Under torchrun: a process whose training step (or checkpoint) does not finish "
                   "within this many seconds ends the run with a message (another process died or "
                   "hangs); a step that compiles gets 30 minutes more.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@click.option("--verify-kernels", is_flag=True,
              help="Triton backend: check the first call of every kernel and shape against the "
                   "torch reference and drop a kernel that disagrees (one warning line each).")
@user_errors
def train(res, data, steps, batch_size, filters, z_dim, h, gamma, lambda_k, lr, lr_d, lr_min, lr_half_every,
          lr_stall, separate_z, variant, cs_alpha, pt_weight, pt_centred, ms_weight, fm_weight, fm_pixels, fm_data, sw_weight, k_init,
          k_min, k_target, lambda_gamma, pt_anneal,
          pt_final, k_min_anneal, ema_decay, skip, mbstd_group, sw_max_side, augment_shift, vanishing_residual, precision,
          backend, device, seed, out, resume,
          sample_every, ckpt_every, log_every, keep_ckpts, max_restores, no_progress,
          on_collapse="warn", health_patience=200, compile_step="auto", no_compile=False,
          reference_step=False, verify_kernels=False, dist_timeout=300.0):
    """Train BEGAN (on the embedded procedural faces unless --data is given).

    Several GPUs or machines: torchrun [--nnodes M] --nproc-per-node N -m fastbegan train ...
    (--batch-size is the global batch; docs/training.md)."""
    from . import ops
    from .checkpoint import latest_checkpoint, read_config
    from .distributed import is_main_process
    from .train import TrainConfig, resolve_device, train as run_training
    if verify_kernels:
        ops.set_verify_kernels(True)
    dev = resolve_device(device)
    main_rank = is_main_process()
    if steps is None:
        steps = 100_000 if dev.type == "cuda" else 300
    if dev.type == "cpu" and main_rank:
        click.echo("Training on CPU: this is for trying things out (try --res 32 --steps 300); "
                   "use a CUDA GPU for real runs.", err=True)
    remedy = dict(gamma=gamma, lambda_k=lambda_k, cs_alpha=cs_alpha, pt_weight=pt_weight, pt_centred=pt_centred,
                  ms_weight=ms_weight, fm_weight=fm_weight, fm_pixels=fm_pixels, fm_data=fm_data, sw_weight=sw_weight,
                  k_init=k_init, k_min=k_min, k_target=k_target,
                  **_lever_options(pt_anneal, k_min_anneal, ema_decay, pt_final))  # on top of the variant
    last = latest_checkpoint(out) if resume else None
    ran = read_config(last) if last is not None else None  # the resumed run's config
    if precision == "auto" and ran and ran.get("precision") in ("fp32", "bf16"):
        # a resumed run keeps the precision it ran: auto's conv timing could choose otherwise
        # this time (noise on a small model, another load), and a resume must continue exactly
        precision = ran["precision"]
    remedy = (resumed_variant_options(ran, **remedy) if ran is not None and variant is None
              else variant_options(variant or DEFAULT_VARIANT, **remedy))
    cfg = TrainConfig(res=res, filters=filters, z_dim=z_dim, h=h, batch_size=batch_size, steps=steps,
                      lr=lr, lr_d=lr_d, lr_min=lr_min, lr_half_every=lr_half_every, lr_stall=lr_stall,
                      lambda_gamma=lambda_gamma, separate_z=separate_z,
                      **remedy,
                      skip=skip, mbstd_group=mbstd_group, sw_max_side=sw_max_side, augment_shift=augment_shift,
                      vanishing_residual=vanishing_residual, precision=precision, backend=backend,
                      device=str(dev), seed=seed, data=data, out=out, sample_every=sample_every,
                      ckpt_every=ckpt_every, log_every=log_every, keep_ckpts=keep_ckpts,
                      max_restores=max_restores, on_collapse=on_collapse, health_patience=health_patience,
                      compile_step="off" if no_compile else compile_step, reference_step=reference_step,
                      dist_timeout=dist_timeout)
    created = not Path(out).exists()
    check_writable(out)
    try:
        trainer = run_training(cfg, resume=resume, progress=not no_progress,
                               log=lambda m: click.echo(m, err=True))
    except BaseException:
        if created:
            remove_if_empty(out)  # a run that failed before writing anything leaves no folder
        raise
    if main_rank:
        click.echo(f"done: step {trainer.step}; samples, metrics.jsonl and checkpoints in {out}")


def _lever_options(pt_anneal, k_min_anneal, ema_decay, pt_final=None) -> dict:
    """TrainConfig fields of --pt-anneal, --pt-final, --k-min-anneal and --ema-decay (those given)."""
    out = {} if ema_decay is None else {"ema_decay": ema_decay}
    if pt_final is not None:
        out["pt_final"] = pt_final
    for name, window in (("pt", pt_anneal), ("k_min", k_min_anneal)):
        if window:
            out[f"{name}_anneal_start"], out[f"{name}_anneal_end"] = window
    return out


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", type=click.Path(), default=None,
              help="Grid PNG (default samples.png; with --each, a grid is written only if --out or --grid is given).")
@click.option("--n", "n", type=int, default=None, help="Number of samples (default 64, or COLS*ROWS of --grid).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--truncate", type=float, default=1.0, show_default=True,
              help="Truncation: z ~ U(-t, t) with 0 < t <= 1 (smaller: more typical, less varied).")
@click.option("--grid", "grid", default=None, metavar="COLSxROWS", help="Grid layout, e.g. 8x4.")
@click.option("--each", type=click.Path(), default=None,
              help="Also write every sample as its own PNG in this folder (sample_000000.png, ...).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--raw", is_flag=True, help="Use G's trained weights, not the EMA of them the checkpoint may hold.")
@user_errors
def sample(checkpoint, out, n, seed, truncate, grid, each, device, raw=False):
    """Draw samples from a checkpoint's generator into a PNG grid (and/or one file each)."""
    from .images import save_grid
    from .sampling import generate, load_generator, parse_grid, sample_z, save_each
    cols = rows = None
    if grid:
        cols, rows = parse_grid(grid)
    if n is None:
        n = cols * rows if grid else 64
    if n < 1:
        raise click.BadParameter("must be >= 1", param_hint="--n")
    if grid and n > cols * rows:
        raise click.BadParameter(f"{n} samples do not fit a {grid} grid", param_hint="--n")
    g = load_generator(checkpoint, map_location=device, raw=raw)  # its EMA weights if it has them
    images = generate(g, sample_z(n, g.fc.in_features, seed, truncate))
    if each:
        save_each(images, each)
        click.echo(f"wrote {n} samples to {each}/sample_*.png")
    if out is not None or grid is not None or not each:
        path = save_grid(images, out or "samples.png", nrow=cols)
        click.echo(f"wrote {n} samples to {path}")


@main.command()
@click.argument("folder", type=click.Path())
@click.option("--res", type=int, default=64, show_default=True)
@click.option("--out", type=click.Path(), default=None, help="Output .npy (default: FOLDER-RES.npy beside FOLDER).")
@user_errors
def prepare(folder, res, out):
    """Crop, resize and cache an image folder once (then train with --data OUT.npy)."""
    from .data import load_folder, save_array_atomic
    from .model import check_resolution
    check_resolution(res)
    arr, report = load_folder(folder, res, progress=True)
    dest = Path(out) if out else Path(folder).expanduser().resolve().with_name(
        f"{Path(folder).expanduser().resolve().name}-{res}.npy")
    save_array_atomic(dest, arr)
    click.echo(f"{report.summary()} -> {dest}")
    for bad in report.unreadable[:10]:
        click.echo(f"  unreadable: {bad}", err=True)


main.add_command(bench)  # fastbegan/bench/cli.py
main.add_command(doctor)  # fastbegan/doctor.py
for _command in research_cli.COMMANDS:  # interpolate, eval, plot
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
