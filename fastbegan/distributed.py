"""Several GPUs (or CPU processes): ``torchrun --nproc-per-node N -m fastbegan train ...``.

Data parallel with a *global* batch: ``--batch-size B`` is the whole step's batch and
each of the W processes takes B / W rows of it. Every rank keeps the same data/z
generator, so all draw the same global indices, flips and z, and rank r uses rows
``r*B/W .. (r+1)*B/W``. One all-reduce after the backward averages D's and G's gradients
and the two losses (one buffer), so k_t, M and every Adam step are the same on all ranks
and equal, up to summation order, to one process with batch B. Rank 0 alone writes and
prints; a checkpoint resumes on any number of processes. Single-process runs never touch
``torch.distributed`` (:func:`info` is then rank 0 of 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` rows."""
        if not self.enabled:
            return slice(None)
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def env_info() -> DistInfo:
    """Rank / world size as torchrun sets them in the environment (1 process if unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def info() -> DistInfo:
    """The current process group's rank and size (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return DistInfo(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def is_main_process() -> bool:
    """Rank 0, or no distributed launch at all (usable before :func:`init_from_env`)."""
    return info().is_main and env_info().is_main


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); no-op alone."""
    env = env_info()
    if env.world <= 1 or (dist.is_available() and dist.is_initialized()):
        return info()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = device != "cpu" and not str(device).startswith("cpu") and torch.cuda.is_available()
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} "
                               "CUDA GPUs: use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return info()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device, di: DistInfo) -> torch.device:
    """A bare ``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process run."""
    if di.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", di.local_rank)
    return device


def check_batch(batch_size: int, di: DistInfo, pairs: bool = False) -> None:
    """The global batch splits evenly; with ``pairs`` (the pulling-away term, computed over
    each process's own batch like an unsynchronised batch norm) each share holds >= 2."""
    if di.enabled and batch_size % di.world:
        raise ValueError(f"--batch-size {batch_size} (the global batch) is not divisible by the "
                         f"{di.world} processes: use a multiple of {di.world}")
    if di.enabled and pairs and batch_size // di.world < 2:
        raise ValueError(f"the pulling-away term (--pt-weight) compares the samples of each process's "
                         f"batch: use --batch-size >= {2 * di.world} for {di.world} processes, or --pt-weight 0")


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def average_grads_and_losses(params, losses: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average ``.grad`` of ``params`` and the 0-d ``losses`` over all ranks, in one
    all-reduce of one flat fp32 buffer; returns the averaged losses (new tensors)."""
    params = [p for p in params if p.grad is not None]
    world = dist.get_world_size()
    flat = torch.cat([p.grad.reshape(-1).float() for p in params]
                     + [torch.stack([l.detach().float() for l in losses])])
    dist.all_reduce(flat)
    flat.div_(world)
    o = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[o:o + n].view(p.grad.shape))
        o += n
    return list(flat[o:].unbind())


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any (a host synchronisation)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
