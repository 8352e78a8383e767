"""A run's log, ``RUN_DIR/metrics.jsonl``: one JSON object per logged step, read back here.

Rows hold ``step``, ``loss_real``, ``loss_fake``, ``loss_d``, ``k``, ``M``, ``lr``,
``steps_per_s`` and ``time``, plus the health monitor's signals and ``events`` (messages).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl (a RUN_DIR or the file itself), in file order.

    A line cut by a kill (or any non-JSON line) and rows without ``step`` are skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {str(path)!r}: pass a run folder written by "
                                "`fastbegan train` (its --out)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows
