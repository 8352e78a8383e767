"""torch.compile of the fused step: when, in which mode, and what earlier runs recorded.

The policy half of the step's compilation (the compiled forward itself and its self-check
are :mod:`fastbegan.autocompile`): the compile mode per device (:data:`DEFAULT_COMPILE_MODE`
on CUDA, :data:`CPU_COMPILE_MODE` on a CPU), inductor's on-disk cache, the records of
earlier compiled runs (``$FASTBEGAN_CACHE/compile_times.json``, keyed by
:func:`config_key`) and ``--compile auto``'s decision (:func:`decide`).

When it pays on a CPU: compiling costs a one-off ``T_c`` seconds (dynamo, AOTAutograd,
inductor's C++ build; much less once inductor's on-disk cache holds the graphs) and then
saves a fraction ``g`` of every step. ``--compile auto`` compiles iff the steps still to
run win that back::

    steps_left * t_eager * g  >  T_c

``t_eager`` is the run's own eager step time, measured on its first steps. ``g`` and
``T_c`` are what the last compiled run of the same configuration measured (its compile
time reflects the warm cache a later run finds); for a configuration never compiled here,
the defaults below, measured on the project's 2-core CPU
(benchmarks/results/cpu-*-anatomy-*.md). On CUDA, auto compiles (GPU runs are long). On
every device, a configuration whose compilation failed the self-check here is not
compiled again (docs/design.md §4.2).
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

# torch.compile mode of the step's forward on CUDA: no CUDA graphs of inductor's own (the
# step captures its own graph around the whole step; cudagraph trees must not nest in it).
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"
# On a CPU (torch backend): inductor's default mode with its C++ wrapper, which makes the
# compiled graph's hundreds of kernel and oneDNN calls per step from C++ instead of
# Python (the anatomy results file times both; docs/design.md §4.4).
CPU_COMPILE_MODE = "default+cpp_wrapper"

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


# ------------------------------------------------------------------ the record's key
def config_key(cfg, device: torch.device, backend: str | None = None, world: int = 1) -> str:
    """What a compiled step depends on, as the key of its record: the device (GPU name and
    capability; a CPU's vector ISA), torch and triton versions, every config field that
    changes the compiled graph (shapes, precision, backend, the loss constants gamma and
    lambda_k, the remedies' terms and anneal window, skip, carry, flip; the per-process
    batch under torchrun: ``world`` processes), and the code the graph and its check are
    made of (:func:`step_code_version`). A record is measured on one of these and is not
    carried over to another: a self-check failure under one torch must not stop a fixed one
    from compiling, and a gain once recorded as negative would otherwise stop auto from
    ever measuring it again."""
    return (f"{device.type} {device_id(device)}|torch {torch.__version__}|triton {_triton_version()}"
            f"|{cfg.precision}|{backend or cfg.backend}|res {cfg.res}|n {cfg.filters}|z {cfg.z_dim}"
            f"|h {cfg.h}|b {cfg.batch_size}{f'/{world}' if world > 1 else ''}|g {cfg.gamma:g}"
            f"|lk {cfg.lambda_k:g}|skip {cfg.skip}|vr {bool(cfg.vanishing_residual)}|flip {cfg.flip}"
            f"|cs {cfg.cs_alpha:g}|pt {cfg.pt_weight:g}{_pt_anneal(cfg)}{'|ptc' if cfg.pt_centred else ''}"
            f"{f'|ms {cfg.ms_weight:g}' if cfg.ms_weight else ''}"
            f"{f'|fm {cfg.fm_weight:g}' if getattr(cfg, 'fm_weight', 0) else ''}"
            f"{'|fmpx' if getattr(cfg, 'fm_pixels', False) else ''}{'|fmdata' if getattr(cfg, 'fm_data', False) else ''}"
            f"{f'|sw {cfg.sw_weight:g}/{cfg.sw_max_side}' if getattr(cfg, 'sw_weight', 0) else ''}"
            f"{f'|mbstd {cfg.mbstd_group}' if getattr(cfg, 'mbstd_group', 0) else ''}"
            f"{f'|aug {cfg.augment_shift:g}' if getattr(cfg, 'augment_shift', 0) else ''}|code {step_code_version()}")


def device_id(device: torch.device) -> str:
    """What the compiled code is generated for: a GPU's name and compute capability;
    a CPU's architecture and the vector ISA inductor's C++ code targets."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    isa = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    return f"{platform.machine()} {isa}"


def _triton_version() -> str:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "none"


def _pt_anneal(cfg) -> str:
    """The pulling-away weight's anneal window, part of the compiled graph (empty if off)."""
    return f"|pt-anneal {cfg.pt_anneal_start}-{cfg.pt_anneal_end}-{cfg.pt_final:g}" if cfg.pt_anneal_end else ""


@functools.lru_cache(maxsize=1)
def step_code_version() -> str:
    """A short hash of the source files the compiled step is made of (model, step, remedies,
    augment and images: the shifts and the batch conversion inside the graph, ops and the
    Triton kernels/ folder) and of the compile machinery (modes, compiled forward, self-check)."""
    from . import kernels
    root = Path(__file__).resolve().parent
    files = [root / f for f in ("model.py", "step.py", "remedies.py", "augment.py", "images.py",
                                "compile_policy.py", "autocompile.py", "compile_check.py")]
    files += sorted((root / "ops").glob("*.py")) + sorted(Path(kernels.__file__).resolve().parent.glob("*.py"))
    h = hashlib.sha1()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


# ------------------------------------------------------------------ the records
def records_path() -> Path:
    """The compile records: ``$FASTBEGAN_CACHE/compile_times.json``."""
    from .data import default_cache_dir
    return default_cache_dir() / "compile_times.json"


def recorded(key: str) -> dict:
    """``{"compile_s": ..., "gain": ..., "self_check_error": ...}`` of the last compiled run
    of ``key`` (parts may be absent)."""
    from .data import read_json_table
    entry = read_json_table(records_path()).get(key)
    return entry if isinstance(entry, dict) else {}


def record(key: str, **values: float) -> None:
    """Merge ``values`` into ``key``'s entry (atomic write; errors are ignored)."""
    from .data import read_json_table, write_json_atomic
    path = records_path()
    table = read_json_table(path)
    entry = table.get(key) if isinstance(table.get(key), dict) else {}
    entry.update({k: round(v, 4) for k, v in values.items()})
    table[key] = entry
    write_json_atomic(path, table)


_compiled_here = False  # a compilation has already run in this process


def record_compile_time(key: str, seconds: float) -> None:
    """Record a compilation's time if it was this process's first. A later one finds dynamo
    and inductor warm in memory (a second trainer in one script, a benchmark comparing two
    steps): its time would promise later runs a compile time a new process does not get."""
    global _compiled_here
    if not _compiled_here:
        record(key, compile_s=seconds)
    _compiled_here = True


# ------------------------------------------------------------------ --compile auto
@dataclass
class Decision:
    compile: bool
    why: str


def decide(steps_left: int, t_eager_s: float, precision: str, key: str,
           device_type: str = "cpu") -> Decision:
    """``--compile auto``: never a configuration whose compiled step failed its self-check
    here (any device); else on CUDA always, on a CPU the rule above, with the numbers it
    used in ``why`` (``steps_left`` and ``t_eager_s`` are read on a CPU only)."""
    past = recorded(key)
    if "self_check_error" in past:
        return Decision(False, "the compiled step of this configuration failed its self-check "
                               f"here (error {past['self_check_error']:.3g} times the allowed)")
    if device_type != "cpu":
        return Decision(True, f"{device_type.upper()}")
    gain = past.get("gain", CPU_GAIN.get(precision, min(CPU_GAIN.values())))
    t_c = past.get("compile_s", CPU_COLD_COMPILE_S)
    source = ("the last compiled run of this configuration" if past else
              "defaults: no compiled run of this configuration here yet")
    saved = steps_left * t_eager_s * max(gain, 0.0)
    verdict = saved > t_c
    why = (f"{steps_left} steps x {1e3 * t_eager_s:.0f} ms x {gain:.0%} saved = {saved:.0f} s "
           f"{'>' if verdict else '<='} {t_c:.0f} s to compile; {source}")
    return Decision(verdict, why)
