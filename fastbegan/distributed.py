"""Several GPUs, processes or machines: ``torchrun ... -m fastbegan train ...`` (docs/design.md §4.5).

Data parallel with a *global* batch: ``--batch-size B`` is the whole step's batch and
each of the W processes takes B / W rows of it. Every rank keeps the same data/z
generator, so all draw the same global indices, flips and z, and rank r uses rows
``r*B/W .. (r+1)*B/W``. One all-reduce after the backward averages D's and G's gradients
and the losses (:class:`GradSync`, one buffer), so k_t, M and every Adam step are the same
on all ranks and equal, up to summation order, to one process with batch B; both training
steps call it the same way (``fastbegan.step.Step``). Rank 0 alone writes and prints; a
checkpoint resumes on any number of processes. Single-process runs never touch
``torch.distributed`` (:func:`info` is then rank 0 of 1, not ``enabled``).

Faults: a collective that fails because another process died raises :class:`PeerLost`
(one clear line, exit status 1); a step that does not finish within the timeout (another
process hangs, or a NCCL collective inside a CUDA graph waits for ever) ends the process
from :class:`Watchdog`. Either way the checkpoints on disk are intact (they are written
atomically) and the run resumes with ``--resume``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# How long a rank waits inside a collective before the process group gives up: long, so
# that a rank still compiling its first step (minutes, on another machine with a cold
# cache) is not mistaken for a dead one. The bound a user sees is the Watchdog's.
GROUP_TIMEOUT_S = 3600.0
# Extra time the watchdog gives a step that compiles (torch.compile, autotuning).
COMPILE_GRACE_S = 1800.0


class PeerLost(RuntimeError):
    """Another process of the run died or stopped answering (a collective failed)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: bool = False  # a torch.distributed process group is in use

    @property
    def enabled(self) -> bool:
        """The run is one of a process group's ranks: gradients are all-reduced (a group of
        one process too, which measures the collective's own cost)."""
        return self.world > 1 or self.group

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
        return DistInfo(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", dist.get_rank())), True)
    return DistInfo()


def is_main_process() -> bool:
    """Rank 0, or no distributed launch at all (usable before :func:`init_from_env`)."""
    return info().is_main and env_info().is_main


def init_from_env(device: str = "auto", force: bool = False) -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); no-op alone
    (``force``: a group of one process too, for the benchmark of the collective's cost)."""
    env = env_info()
    if (env.world <= 1 and not force) or (dist.is_available() and dist.is_initialized()):
        return info()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = device != "cpu" and not str(device).startswith("cpu") and torch.cuda.is_available()
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} "
                               "CUDA GPUs: use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(env.local_rank)
    # device_id: NCCL's communicator is created now, not at the first collective, which must
    # never happen inside a CUDA graph capture (the fused step captures its all-reduce)
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
                            **({"device_id": torch.device("cuda", env.local_rank)} if use_cuda else {}))
    return info()


def cleanup(barrier: bool = False) -> None:
    """Leave the process group. ``barrier`` (a run that ended normally on every rank): wait
    until every rank is here first, so no rank tears its gloo/NCCL connections down while
    another is still finishing its last collective (a torn-down peer can abort the other
    process at exit). Never after a failure: a barrier with a dead or stuck peer would hang."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            with peer_errors():
                dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device, di: DistInfo) -> torch.device:
    """A bare ``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process run."""
    if di.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", di.local_rank)
    return device


def check_batch(batch_size: int, di: DistInfo, pairs: bool = False, group: int = 0) -> None:
    """The global batch splits evenly; with ``pairs`` (the pulling-away term, computed over
    each process's own batch like an unsynchronised batch norm) each share holds >= 2; with
    ``group`` (D's minibatch-stddev group, also per process) each share is a multiple of it."""
    if di.enabled and batch_size % di.world:
        raise ValueError(f"--batch-size {batch_size} (the global batch) is not divisible by the "
                         f"{di.world} processes: use a multiple of {di.world}")
    if di.enabled and pairs and batch_size // di.world < 2:
        raise ValueError(f"the pulling-away, mode-seeking and feature-matching terms (--pt-weight, --ms-weight, "
                         f"--fm-weight) compare the samples "
                         f"of each process's batch: use --batch-size >= {2 * di.world} for {di.world} processes, "
                         "or switch them off")
    if di.enabled and group and (batch_size // di.world) % group:
        raise ValueError(f"--mbstd-group {group} must divide each process's batch ({batch_size // di.world} = "
                         f"--batch-size {batch_size} / {di.world} processes): use a batch of a multiple of "
                         f"{group * di.world} or a smaller group")


# ----------------------------------------------------------------------------------------
# collectives
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def peer_errors():
    """Turn a failed collective (gloo: 'Connection reset by peer', a timeout; NCCL: an
    aborted communicator) into :class:`PeerLost` with one plain sentence."""
    try:
        yield
    except PeerLost:
        raise
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise PeerLost(f"rank {info().rank}: lost contact with the other processes of the run "
                       f"(another process died or stopped answering; {first[:200]})") from e


def from_rank0(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (``flag`` itself without a process group)."""
    return bool(values_from_rank0([1.0 if flag else 0.0], device)[0])


def values_from_rank0(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank (``values`` themselves without a process group)."""
    if not info().enabled:
        return list(values)
    t = torch.tensor(values, device=device, dtype=torch.float64)
    with peer_errors():
        dist.broadcast(t, 0)
    return t.tolist()


def check_same_step(step: int, device: torch.device, what: str) -> None:
    """Raise unless every rank is at ``step`` after reading a checkpoint (``what``): rank 0
    writes the checkpoints and every rank reads them, so on several machines ``--out`` must be
    a folder they all see."""
    if not info().enabled:
        return
    lo, hi = -max_over_ranks(-float(step), device), max_over_ranks(float(step), device)
    if lo != hi:
        raise RuntimeError(f"after {what} the processes are at different steps ({lo:.0f} to {hi:.0f}): "
                           "rank 0 writes the checkpoints and every process reads them, so --out must be "
                           "a folder every machine sees (a shared file system)")


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` over all ranks (``value`` itself without a process group)."""
    if not info().enabled:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    with peer_errors():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s."""
    with torch.no_grad(), peer_errors():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def average(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all ranks (a new tensor; ``t`` itself without a process group)."""
    if not info().enabled:
        return t
    t = t.clone()
    with peer_errors():
        dist.all_reduce(t)
    return t / dist.get_world_size()


class GradSync:
    """The one collective of a training step: ``sync(losses) -> losses`` averages the
    ``.grad`` of ``params`` (G's and D's) and the 1-d fp32 ``losses`` over all ranks in ONE
    all-reduce of one flat fp32 buffer, and returns the averaged losses (a new tensor).

    The buffer's layout is fixed by ``params`` alone: every parameter has its slot, in
    order, then the losses. A parameter whose ``.grad`` is None on this rank (it took no
    part in this rank's loss) contributes zeros and gets the averaged slot back as a new
    gradient (in its parameter's memory format). So ranks that disagree on which gradients
    exist still all-reduce buffers of the same size with the same slots; a buffer built
    from the gradients that exist would pair one rank's parameter with another's.

    Device work only (no host read), so it can sit inside a CUDA graph: NCCL collectives
    are captured when every rank captures the same graph. ``seconds`` / ``calls``: the
    host time spent in the all-reduce (the time itself on a CPU; on CUDA only the launch).
    ``world`` and ``all_reduce`` default to the process group's (tests pass their own).
    """

    def __init__(self, params, world: int | None = None, all_reduce=None):
        self.params = list(params)
        self.world = dist.get_world_size() if world is None else world
        self.all_reduce = all_reduce or dist.all_reduce
        self.seconds, self.calls = 0.0, 0

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        parts = [(p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())).float()
                 for p in self.params]
        flat = torch.cat(parts + [losses.detach().float().reshape(-1)])
        t0 = time.perf_counter()
        with peer_errors():
            self.all_reduce(flat)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        flat.div_(self.world)
        o = 0
        for p in self.params:
            n = p.numel()
            avg = flat[o:o + n].view(p.shape)
            if p.grad is None:
                p.grad = torch.empty_like(p).copy_(avg)
            else:
                p.grad.copy_(avg)
            o += n
        return flat[o:]


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any (a host synchronisation)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    with peer_errors():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------------------
# a rank that hangs
# ----------------------------------------------------------------------------------------
class Watchdog:
    """Ends this process when the training loop makes no progress for ``timeout_s``.

    The loop calls :meth:`arm` before each step (and before each checkpoint): it sets a
    deadline ``timeout_s`` (+ ``grace_s`` for a step that compiles) from now. A daemon
    thread checks the deadline; past it, this rank is waiting in a collective for a process
    that died or hangs (or it hangs itself), and no error will come: with NCCL the
    collective may sit inside a CUDA graph, where the process group's own timeout does not
    reach. The thread prints ``message()`` (one line, with the last checkpoint) to stderr
    and exits the process with status 1 (``os._exit``: the stuck main thread cannot run
    cleanup; checkpoints are written atomically, so the last one is intact).
    """

    def __init__(self, timeout_s: float, message, poll_s: float = 1.0):
        self.timeout_s, self.message, self.poll_s = float(timeout_s), message, poll_s
        self._deadline: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastbegan-watchdog", daemon=True)
        self._thread.start()

    def arm(self, grace_s: float = 0.0) -> None:
        self._deadline = time.monotonic() + self.timeout_s + grace_s

    def disarm(self) -> None:
        self._deadline = None

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                try:
                    sys.stderr.write(f"Error: {self.message(self.timeout_s)}\n")
                    sys.stderr.flush()
                finally:
                    os._exit(1)


def resume_hint(out: str | os.PathLike) -> str:
    """Where the run can be resumed from, for the fault messages."""
    from .checkpoint import latest_checkpoint
    last = latest_checkpoint(out)
    if last is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint, {last}, is intact: resume with --resume (on any number of processes)"


def stall_message(out: str | os.PathLike):
    """``message(timeout_s)`` for :class:`Watchdog`."""
    def message(timeout_s: float) -> str:
        return (f"rank {info().rank}: no training step finished within {timeout_s:g} s "
                f"(--dist-timeout): another process died or hangs. Stopping; {resume_hint(out)}")
    return message
