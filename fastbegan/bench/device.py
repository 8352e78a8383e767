"""The machine a benchmark runs on: device name and peak, software versions, git commit."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s.
# First matching substring of torch.cuda.get_device_name() wins (order matters).
PEAK_BF16_TFLOPS: list[tuple[str, str, float]] = [
    ("GH200", "GH200", 989.4),
    ("H200 NVL", "H200 NVL", 835.0),
    ("H200", "H200 SXM", 989.4),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100", "H100 SXM", 989.4),
    ("H800", "H800 SXM", 989.4),
    ("B200", "B200", 2250.0),
    ("A100", "A100", 312.0),
    ("A800", "A800", 312.0),
    ("L40S", "L40S", 362.05),
    ("L40", "L40", 181.05),
    ("L4", "L4", 121.0),
    ("A10G", "A10G", 70.0),
    ("A10", "A10", 125.0),
    ("RTX 6000 Ada", "RTX 6000 Ada", 364.2),
    ("RTX A6000", "RTX A6000", 154.8),
    ("RTX 4090", "RTX 4090", 165.2),
]


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str | None]:
    """(spec dense bf16 TFLOP/s, matched entry) for a CUDA device name, or (None, None)."""
    for key, label, tf in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tf, label
    return None, None


def slugify(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        spec, label = peak_bf16_tflops(name)
        return {"type": "cuda", "name": name, "slug": slugify(name.replace("NVIDIA", "")),
                "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                "memory_gb": round(props.total_memory / 2 ** 30, 1),
                "peak_bf16_tflops_spec": spec, "peak_spec_entry": label}
    return {"type": "cpu", "name": _cpu_name(), "slug": "cpu",
            "threads": torch.get_num_threads(), "peak_bf16_tflops_spec": None,
            "peak_spec_entry": None}


def _cpu_name() -> str:
    """``CPU: <model name>``, with the bf16 units where it has any: virtual machines report
    the same model name ("Intel(R) Xeon(R) Processor") with and without AMX, and bf16 speed
    differs by 5x between them, so a results file's label says which it was."""
    from ..hardware import cpu_bf16_units
    return "CPU: " + _cpu_model() + (f" ({', '.join(units)})" if (units := cpu_bf16_units()) else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def repo_root() -> Path:
    """The checkout this package runs from (fastbegan/bench/device.py -> the repo root)."""
    return Path(__file__).resolve().parents[2]


def git_commit() -> dict:
    root = repo_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": sha or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def env_info() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001 - any broken install
        triton_version = f"not importable ({e.__class__.__name__})"
    info = {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "cuda": torch.version.cuda, "cudnn": None, "platform": platform.platform(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    info.update(git_commit())
    return info


def default_results_dir() -> Path:
    env = os.environ.get("FASTBEGAN_BENCH_RESULTS")
    if env:
        return Path(env)
    cwd = Path.cwd() / "benchmarks" / "results"
    if cwd.parent.is_dir():
        return cwd
    return repo_root() / "benchmarks" / "results"
