"""Training curves from a run's metrics.jsonl: k_t, M_global, L_real, L_fake and lr over steps.

``fastbegan plot RUN_DIR`` and ``plot_run(run_dir)`` (called by the trainer at the end of
``fit``) write ``RUN_DIR/metrics.png``. matplotlib is a dependency; should it be missing,
:class:`PlotsUnavailable` says so and training just skips the plot.
"""
from __future__ import annotations

import os
from pathlib import Path

from .runlog import read_metrics

# panel: (metrics.jsonl key, title, log scale)
PANELS = (("k", "k_t (equilibrium control)", False),
          ("M", "M_global (convergence measure)", False),
          ("loss_real", "L_real = L(x)", False),
          ("loss_fake", "L_fake = L(G(z))", False),
          ("lr", "learning rate", True))
FIG_INCHES = (8.0, 11.0)
DPI = 100  # -> an 800 x 1100 pixel PNG


class PlotsUnavailable(RuntimeError):
    """matplotlib is missing."""


MISSING_MATPLOTLIB = "plots need matplotlib, which is not installed: pip install matplotlib"


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotsUnavailable(MISSING_MATPLOTLIB) from None
    return plt


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl into ``out`` (default RUN_DIR/metrics.png) and return the path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no rows yet")
    plt = _pyplot()
    out = Path(out) if out else (run_dir if run_dir.is_dir() else run_dir.parent) / "metrics.png"
    steps = [r["step"] for r in rows]
    events = [r["step"] for r in rows if r.get("event") or r.get("events")]  # lr halvings, health notes
    fig, axes = plt.subplots(len(PANELS), 1, figsize=FIG_INCHES, dpi=DPI, sharex=True)
    try:
        for ax, (key, title, log) in zip(axes, PANELS):
            pts = [(s, r[key]) for s, r in zip(steps, rows) if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), lw=1.2, marker="." if len(pts) < 50 else None)
                if log and all(v > 0 for _, v in pts):
                    ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center", transform=ax.transAxes)
            for s in events:
                ax.axvline(s, color="tab:red", lw=0.8, ls="--")
            gammas = [(s, r["gamma"]) for s, r in zip(steps, rows) if isinstance(r.get("gamma"), (int, float))]
            if key == "k" and gammas:  # --k-target: the adapted gamma beside the k_t it holds
                twin = ax.twinx()
                twin.plot(*zip(*gammas), lw=1.0, color="tab:orange")
                twin.set_ylabel("gamma (adapted)", color="tab:orange", fontsize=9)
                title += ", gamma adapted (orange, right axis)"
            ax.set_title(title, fontsize=10, loc="left")
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        fig.suptitle(f"{run_dir.name}: {len(rows)} logged steps, last {steps[-1]}", fontsize=11)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            fig.savefig(tmp, format="png", dpi=DPI)  # fixed size: no bbox_inches="tight"
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        plt.close(fig)
    return out
