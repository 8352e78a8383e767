"""Checkpoints: safetensors files written atomically, with format version and config.

A checkpoint is one ``.safetensors`` file: tensors (G and D parameters, optimiser
state, k_t, step, RNG states) and string metadata (format name and version, the run's
config as JSON, and small host-side trainer state as JSON). It is written to a temporary
file in the same folder, fsync'ed, then renamed over the final name, so a crash or a
SIGKILL never leaves a half-written checkpoint under a real name. The last ``keep``
checkpoints are kept (``ckpt_00001000.safetensors``, ...).
"""
from __future__ import annotations

import errno
import json
import os
import re
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

FORMAT = "fastbegan-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8,})\.safetensors$")
_TMP = re.compile(r"^\.ckpt_\d{8,}\.safetensors\.tmp(\d+)$")

# Config fields that define the networks' shapes: a checkpoint whose values differ
# cannot be resumed or loaded into this config.
MODEL_FIELDS = ("res", "filters", "z_dim", "h", "skip", "vanishing_residual_on", "mbstd_group")
MODEL_DEFAULTS = {"mbstd_group": 0}  # a field's value in checkpoints written before it existed


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that says why and what to do."""


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"ckpt_{step:08d}.safetensors"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints of a run folder, oldest first (temporary files ignored)."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step in a checkpoint's name: ``.../ckpt_00001000.safetensors`` -> 1000."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{str(path)!r} is not named like a checkpoint (ckpt_<step>.safetensors)")
    return int(m.group(1))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict,
                    state: dict | None = None, keep: int | None = None) -> Path:
    """Write atomically; prune to the newest ``keep`` checkpoints in the same folder.

    The bytes go to ``.<name>.tmp<pid>`` in the same folder, are fsync'ed, then renamed
    over the final name: a crash or SIGKILL at any point leaves either the previous
    checkpoints only, or the new one complete. Temporary files left by a killed writer
    are removed by the next save. A failed write (disk full, ...) removes its temporary
    file and raises :class:`CheckpointError`; earlier checkpoints are untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(path.parent)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config, sort_keys=True),
            "state": json.dumps(state or {}, sort_keys=True)}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write_file(tmp, save_bytes(tensors, metadata=meta))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"could not write checkpoint {str(path)!r}: {why}. The previous "
                              "checkpoints are intact; free some space (or choose another --out) "
                              "and resume with --resume") from e
    finally:
        tmp.unlink(missing_ok=True)
    if keep:
        for old in list_checkpoints(path.parent.parent)[:-keep]:
            old.unlink(missing_ok=True)
    return path


_CHUNK = 1 << 22


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` in chunks and fsync. ``FASTBEGAN_TEST_SLOW_CKPT=<seconds>`` (tests
    only) writes 4 KiB chunks with that pause after each, so that a test can kill the
    process while a temporary file is half written."""
    delay = float(os.environ.get("FASTBEGAN_TEST_SLOW_CKPT", "0") or 0)
    chunk = 1 << 12 if delay else _CHUNK
    view = memoryview(data)
    with open(path, "wb") as f:
        for i in range(0, len(view), chunk):
            f.write(view[i:i + chunk])
            if delay:
                f.flush()
                time.sleep(delay)
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: leave its file alone
    return True


def clean_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.ckpt_*.safetensors.tmp<pid>`` files whose writer is gone (a killed run)."""
    removed = []
    d = Path(folder)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        m = _TMP.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (tensors, config, state). Raises CheckpointError with a readable message."""
    return _read(path, map_location)


def read_config(path: str | os.PathLike) -> dict:
    """The run configuration a checkpoint was written with (its metadata only, no tensors)."""
    return _read(path, None)[1]


def _read(path: str | os.PathLike, map_location: str | None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device=str(map_location)) if map_location is not None else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or truncated ({e}); "
                              "delete it to resume from the previous one") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a fastbegan checkpoint")
    if int(meta.get("version", -1)) > VERSION:
        raise CheckpointError(f"{str(path)!r} has format version {meta['version']}, newer than this "
                              f"fastbegan understands ({VERSION}): upgrade fastbegan")
    return tensors, json.loads(meta["config"]), json.loads(meta.get("state", "{}"))


def check_compatible(ckpt_config: dict, config: dict, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose networks differ from ``config``'s, naming the fields."""
    def field(cfg, k):
        return cfg.get(k, MODEL_DEFAULTS.get(k))
    diff = [f"{k}={field(ckpt_config, k)!r} (this run: {field(config, k)!r})"
            for k in MODEL_FIELDS if field(ckpt_config, k) != field(config, k)]
    if diff:
        raise CheckpointError(f"checkpoint {str(path)!r} is from another configuration: "
                              + ", ".join(diff) + ". Pass the same options as the run that wrote "
                              "it, or use a new --out folder to start afresh.")


def prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in sd.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """load_state_dict that keeps each parameter's memory format (channels_last weights)."""
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("carry")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")


def match_state_layout(opt: torch.optim.Optimizer) -> int:
    """Give every optimiser state tensor its parameter's memory layout; returns how many
    were changed.

    ``Optimizer.load_state_dict`` casts the loaded state to the parameter's dtype and
    device but keeps the checkpoint's strides: moments saved contiguous (NCHW) come back
    NCHW for channels_last conv weights. Fused Adam walks param, grad and moments as flat
    buffers: on CUDA it refuses mismatched layouts ("params, grads, exp_avgs, and
    exp_avg_sqs must have same dtype, device, and layout"), on CPU it silently pairs the
    wrong elements. Call this after loading optimiser state.
    """
    changed = 0
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            for key, val in (st or {}).items():
                if torch.is_tensor(val) and val.shape == p.shape and val.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=val.dtype).copy_(val)
                    changed += 1
    return changed
