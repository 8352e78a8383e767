"""Optional TensorBoard logging: a writer that does nothing unless tensorboard is installed.

The trainer calls ``TBWriter(run_dir / "tb").log_row(row)`` at every log step; with
``pip install fastbegan[tensorboard]`` the scalars (k_t, M_global, losses, lr,
steps/s) appear under ``tensorboard --logdir RUN_DIR/tb``. Without it, nothing is
written and nothing fails. Logging errors never stop training: the writer disables
itself after the first one.
"""
from __future__ import annotations

import os
from pathlib import Path

# metrics.jsonl key -> TensorBoard tag
TAGS = {"k": "began/k_t", "M": "began/M_global", "loss_real": "loss/L_real",
        "loss_fake": "loss/L_fake", "loss_d": "loss/L_D", "lr": "train/lr",
        "steps_per_s": "train/steps_per_s"}


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:  # ImportError, or a tensorboard install torch cannot use
        return False
    return True


class TBWriter:
    """``log_row(row)`` / ``close()``; a no-op when tensorboard is not importable."""

    def __init__(self, log_dir: str | os.PathLike, writer_factory=None):
        self.writer = None
        if writer_factory is None:
            try:
                from torch.utils.tensorboard import SummaryWriter as writer_factory
            except Exception:
                return
        try:
            self.writer = writer_factory(log_dir=str(Path(log_dir)))
        except Exception:
            self.writer = None

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def log_row(self, row: dict) -> None:
        if self.writer is None:
            return
        try:
            step = int(row["step"])
            for key, tag in TAGS.items():
                v = row.get(key)
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(tag, float(v), step)
            self.writer.flush()
        except Exception:
            self.close()

    def close(self) -> None:
        w, self.writer = self.writer, None
        if w is not None:
            try:
                w.close()
            except Exception:
                pass
