"""When torch.compile pays for the fused training step (``--compile auto``).

Compiling the step's forward region costs a one-off ``T_c`` seconds (dynamo, AOTAutograd,
inductor's C++ build; much less once inductor's on-disk cache holds the graphs) and then
saves a fraction ``g`` of every step. ``--compile auto`` compiles iff the steps still to
run win that back::

    steps_left * t_eager * g  >  T_c

``t_eager`` is the run's own eager step time, measured on its first steps. ``g`` and
``T_c`` are what the last compiled run of the same configuration measured (recorded in
``$FASTBEGAN_CACHE/compile_times.json``: its compile time reflects the warm cache a later
run finds); for a configuration never compiled here, the defaults below, measured on the
project's 2-core CPU (benchmarks/results/cpu-*-anatomy-*.md). On CUDA, auto always
compiles (GPU runs are long).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Defaults for a configuration never compiled here, from the anatomy results file (2-core
# Xeon, AMX-BF16; fused step, n 64, batch 16; C++ wrapper): per precision the smallest gain
# it measured (bf16: 27% at res 32, 18% at res 64; fp32: 17% at res 32), and its largest
# cold-cache compile time (69.2 s, res 64).
CPU_GAIN = {"bf16": 0.18, "fp32": 0.17}
CPU_COLD_COMPILE_S = 69.2
EAGER_PROBE_STEPS = 3  # eager steps timed before deciding (the first one is not timed)
GAIN_STEPS = 5         # compiled steps timed after the compilation, to record the gain


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
    """What a compiled step depends on: shapes, precision, options (the remedies add terms
    to the graph), torch version, and the code of the step itself: a recorded gain is
    measured on one version of the step and is not carried over to another (a gain once
    recorded as negative would otherwise stop auto from ever compiling, and so from ever
    measuring it again)."""
    return (f"{device.type}|torch {torch.__version__}|{cfg.precision}|res {cfg.res}|n {cfg.filters}|"
            f"z {cfg.z_dim}|h {cfg.h}|b {cfg.batch_size}|skip {cfg.skip}|vr {bool(cfg.vanishing_residual)}"
            f"|flip {cfg.flip}|cs {cfg.cs_alpha:g}|pt {cfg.pt_weight:g}|code {step_code_version()}")


@functools.lru_cache(maxsize=1)
def step_code_version() -> str:
    """A short hash of the source files the compiled step is made of (model, step, ops)."""
    root = Path(__file__).resolve().parent
    files = [root / "model.py", root / "step.py", root / "remedies.py", *sorted((root / "ops").glob("*.py"))]
    h = hashlib.sha1()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def records_path() -> Path:
    """The compile records: ``$FASTBEGAN_CACHE/compile_times.json``."""
    from .data import default_cache_dir
    return default_cache_dir() / "compile_times.json"


def recorded(key: str) -> dict:
    """``{"compile_s": ..., "gain": ...}`` of the last compiled run of ``key`` (parts may be absent)."""
    try:
        entry = json.loads(records_path().read_text())[key]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return entry if isinstance(entry, dict) else {}


def record(key: str, **values: float) -> None:
    """Merge ``values`` into ``key``'s entry (atomic write; errors are ignored)."""
    path = records_path()
    try:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        entry = table.get(key) if isinstance(table.get(key), dict) else {}
        entry.update({k: round(v, 4) for k, v in values.items()})
        table[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


_compiled_here = False  # a compilation has already run in this process


def record_compile_time(key: str, seconds: float) -> None:
    """Record a compilation's time if it was this process's first. A later one finds dynamo
    and inductor warm in memory (a second trainer in one script, a benchmark comparing two
    steps): its time would promise later runs a compile time a new process does not get."""
    global _compiled_here
    if not _compiled_here:
        record(key, compile_s=seconds)
    _compiled_here = True


@dataclass
class Decision:
    compile: bool
    why: str


def decide(steps_left: int, t_eager_s: float, precision: str, key: str) -> Decision:
    """The CPU rule above, with the numbers it used in ``why``."""
    past = recorded(key)
    if "self_check_error" in past:
        return Decision(False, "the compiled step of this configuration failed its gradient "
                               f"self-check here (error {past['self_check_error']:.3g})")
    gain = past.get("gain", CPU_GAIN.get(precision, min(CPU_GAIN.values())))
    t_c = past.get("compile_s", CPU_COLD_COMPILE_S)
    source = ("the last compiled run of this configuration" if past else
              "defaults: no compiled run of this configuration here yet")
    saved = steps_left * t_eager_s * max(gain, 0.0)
    verdict = saved > t_c
    why = (f"{steps_left} steps x {1e3 * t_eager_s:.0f} ms x {gain:.0%} saved = {saved:.0f} s "
           f"{'>' if verdict else '<='} {t_c:.0f} s to compile; {source}")
    return Decision(verdict, why)
