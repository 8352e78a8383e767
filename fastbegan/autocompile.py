"""When torch.compile pays for the fused training step (``--compile auto``).

Compiling the step's forward region costs a one-off ``T_c`` seconds (dynamo, AOTAutograd,
inductor's C++ build; much less once inductor's on-disk cache holds the graphs) and then
saves a fraction ``g`` of every step. ``--compile auto`` compiles iff the steps still to
run win that back::

    steps_left * t_eager * g  >  T_c

``t_eager`` is the run's own eager step time, measured on its first steps; ``g`` and the
cold-start ``T_c`` were measured on the project's 2-core CPU (docs/design.md, "When
compiling pays"). After every compilation the time it took is recorded per configuration
in ``$FASTBEGAN_CACHE/compile_times.json``; later runs of that configuration use the
record, which reflects the warm cache. On CUDA, auto always compiles (GPU runs are long).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Measured on the project's CPU machine (Xeon, 2 cores, AMX-BF16), fused step, res 32/64,
# n 64, batch 16: the share of an eager step that compiling saves, and a cold compile's
# seconds (empty inductor cache). See docs/design.md, "When compiling pays".
CPU_GAIN = {"bf16": 0.20, "fp32": 0.15}
CPU_COLD_COMPILE_S = 45.0
EAGER_PROBE_STEPS = 3  # eager steps timed before deciding (the first one is not timed)


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled graphs: $TORCHINDUCTOR_CACHE_DIR if the user set it,
    else a folder in fastbegan's cache (kept across reboots, unlike /tmp)."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    from .data import default_cache_dir
    return default_cache_dir() / "inductor"


def use_persistent_inductor_cache() -> Path:
    """Point inductor at :func:`inductor_cache_dir` (before anything is compiled)."""
    path = inductor_cache_dir()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    return path


def config_key(cfg, device: torch.device) -> str:
    """What a compiled step depends on: shapes, precision, options, torch version."""
    return (f"{device.type}|torch {torch.__version__}|{cfg.precision}|res {cfg.res}|n {cfg.filters}|"
            f"z {cfg.z_dim}|h {cfg.h}|b {cfg.batch_size}|skip {cfg.skip}|vr {bool(cfg.vanishing_residual)}"
            f"|flip {cfg.flip}")


def _times_path() -> Path:
    from .data import default_cache_dir
    return default_cache_dir() / "compile_times.json"


def recorded_compile_s(key: str) -> float | None:
    try:
        return float(json.loads(_times_path().read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_compile_s(key: str, seconds: float) -> None:
    """Remember how long compiling ``key`` took (atomic write; errors are ignored)."""
    path = _times_path()
    try:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[key] = round(seconds, 2)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


@dataclass
class Decision:
    compile: bool
    why: str


def decide(steps_left: int, t_eager_s: float, precision: str, key: str) -> Decision:
    """The CPU rule above, with the numbers it used in ``why``."""
    gain = CPU_GAIN.get(precision, min(CPU_GAIN.values()))
    recorded = recorded_compile_s(key)
    t_c = recorded if recorded is not None else CPU_COLD_COMPILE_S
    source = "last compile of this configuration" if recorded is not None else "cold-cache estimate"
    saved = steps_left * t_eager_s * gain
    verdict = saved > t_c
    why = (f"{steps_left} steps x {1e3 * t_eager_s:.0f} ms x {gain:.0%} saved = {saved:.0f} s "
           f"{'>' if verdict else '<='} {t_c:.0f} s to compile ({source})")
    return Decision(verdict, why)
