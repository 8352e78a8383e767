"""The research tools' commands: ``fastbegan interpolate | eval | plot`` (cli.py adds them)."""
from __future__ import annotations

from pathlib import Path

import click

from .errors import user_errors


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--seeds", "seeds", type=int, nargs=2, multiple=True, metavar="A B",
              help="Interpolate between the random latents of seeds A and B (repeatable: one row per pair).")
@click.option("--from-images", "from_images", type=click.Path(), nargs=2, multiple=True,
              metavar="A.png B.png", help="Interpolate between two image files (repeatable).")
@click.option("--pairs", type=int, default=4, show_default=True,
              help="Without --seeds/--from-images: this many pairs of real training images.")
@click.option("--frames", type=int, default=8, show_default=True, help="Images along each line.")
@click.option("--invert-steps", type=int, default=300, show_default=True,
              help="Adam steps to fit z to each real image.")
@click.option("--invert-lr", type=float, default=0.05, show_default=True)
@click.option("--restarts", type=int, default=16, show_default=True,
              help="Random z tried per image; the best one starts the optimisation.")
@click.option("--truncate", type=float, default=1.0, show_default=True,
              help="With --seeds: z ~ U(-t, t).")
@click.option("--data", type=click.Path(), default=None,
              help="Real images for the default mode (default: the checkpoint's training data).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), default="interpolation.png", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--raw", is_flag=True, help="Use G's trained weights, not the EMA of them the checkpoint may hold.")
@user_errors
def interpolate(checkpoint, seeds, from_images, pairs, frames, invert_steps, invert_lr, restarts,
                truncate, data, seed, out, device, raw=False):
    """Latent interpolation (one row per pair): between real images (z found by optimisation,
    the BEGAN paper's figure), between random latents (--seeds), or image files (--from-images)."""
    from .images import save_grid
    from .interpolate import interpolate_images, interpolate_seeds
    from .sampling import load_generator
    if seeds and from_images:
        raise click.UsageError("use either --seeds or --from-images, not both")
    if frames < 2:
        raise click.BadParameter("must be >= 2", param_hint="--frames")
    g = load_generator(checkpoint, map_location=device, raw=raw)  # its EMA weights if it has them
    if seeds:
        imgs = interpolate_seeds(g, list(seeds), frames, truncate)
        path = save_grid(imgs, out, nrow=frames)
        click.echo(f"wrote {len(seeds)} interpolation(s) between seed pairs to {path}")
        return
    x_a, x_b, what = _image_pairs(g.config, from_images, pairs, data, seed)
    click.echo(f"fitting z to {2 * len(x_a)} images ({invert_steps} Adam steps)...", err=True)
    imgs, inv = interpolate_images(g, x_a, x_b, frames, steps=invert_steps, lr=invert_lr,
                                   restarts=restarts, seed=seed)
    path = save_grid(imgs, out, nrow=frames + 2)
    click.echo(f"wrote {what} to {path} (rows: real | G(z_a) ... G(z_b) | real); "
               f"inversion L1 {float(inv.loss_init.mean()):.4f} -> {float(inv.loss_final.mean()):.4f}")


def _image_pairs(cfg: dict, from_images, pairs: int, data, seed: int):
    """(x_a, x_b, description): the image files of --from-images, else ``pairs`` random pairs
    of the run's training images; (P, 3, res, res) in [-1, 1]."""
    import numpy as np

    from .data import load_dataset, load_image
    from .images import to_unit_range
    res = cfg["res"]
    if from_images:
        arr = []
        for a, b in from_images:
            for p in (a, b):
                if not Path(p).is_file():
                    raise click.BadParameter(f"{p!r} does not exist", param_hint="--from-images")
                arr.append(load_image(Path(p), res))
        x = to_unit_range(np.stack(arr))
        return x[0::2], x[1::2], f"{len(from_images)} image pair(s)"
    if pairs < 1:
        raise click.BadParameter("must be >= 1", param_hint="--pairs")
    arr, _ = load_dataset(data if data is not None else cfg.get("data"), res,
                          n_procedural=cfg.get("n_procedural", 4096), seed=cfg.get("seed", 0))
    idx = np.random.default_rng(seed).choice(len(arr), 2 * pairs, replace=len(arr) < 2 * pairs)
    x = to_unit_range(arr[idx])
    return x[:pairs], x[pairs:], f"{pairs} pair(s) of training images"


@click.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", type=click.Path(), default=None,
              help="Report folder (default RUN_DIR/eval/<checkpoint name>).")
@click.option("--n", "n", type=int, default=512, show_default=True,
              help="Generated and real images compared.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--data", type=click.Path(), default=None,
              help="Real images (default: the checkpoint's training data).")
@click.option("--swd-patches", type=int, default=64, show_default=True, help="7x7 patches per image and level.")
@click.option("--swd-dirs", type=int, default=512, show_default=True, help="Random projections.")
@click.option("--no-factors", is_flag=True, help="Skip the factor score (it trains a small regressor once).")
@click.option("--fid-weights", type=click.Path(), default=None,
              help="Local Inception weights file: also compute FID / IS with torch-fidelity (never downloaded).")
@click.option("--truncate", type=float, default=1.0, show_default=True,
              help="Score samples with z ~ U(-t, t), 0 < t <= 1 (smaller: more typical, less varied).")
@click.option("--raw", is_flag=True, help="Score G's trained weights, not the EMA of them the checkpoint may hold.")
@user_errors
def eval_(checkpoint, out, n, seed, device, data, swd_patches, swd_dirs, no_factors, fid_weights, truncate=1.0,
          raw=False):
    """Quality report for a checkpoint: M_global, SWD, precision/recall, factor score, nearest neighbours
    (JSON + Markdown + PNG)."""
    from .evaluate import evaluate
    r = evaluate(checkpoint, out, n=n, seed=seed, device=device, data=data, fid_weights=fid_weights,
                 swd_patches=swd_patches, swd_dirs=swd_dirs, factors=not no_factors, truncate=truncate, raw=raw,
                 log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {r['out']}/report.md and report.json")


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", type=click.Path(), default=None, help="PNG path (default RUN_DIR/metrics.png).")
@user_errors
def plot(run_dir, out):
    """Plot k_t, M_global, L_real, L_fake and lr over steps from RUN_DIR/metrics.jsonl."""
    from .plots import PlotsUnavailable, plot_run
    try:
        path = plot_run(run_dir, out)
    except PlotsUnavailable as e:
        raise click.ClickException(str(e)) from None
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")


COMMANDS = (interpolate, eval_, plot)
