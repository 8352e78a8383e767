"""The BEGAN trainer: a run's state and the training loop (docs/design.md §4).

:class:`Trainer` owns the model, both Adam optimisers, the data set (uint8, on the device),
BEGAN's state (k_t, step, lr) and the run's checkpoint state (``state_tensors`` /
``load_state``). One step is ``train_step``: the :class:`fastbegan.step.Step` that
:func:`fastbegan.step.make_step` picked (the fused single-pass step, or the reference
step). ``fit`` is the loop: scalars read every ``log_every`` steps (the only host
synchronisation), samples, atomic checkpoints with exact resume, and the log hooks (the
divergence guard, :mod:`fastbegan.guard`; the health monitor). :func:`train` loads the
data and runs a config, also under torchrun (:mod:`fastbegan.distributed`). User guide:
docs/training.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed
from . import ops
from . import remedies
from .guard import DivergenceGuard
from .hardware import PRECISIONS, configure_threads, resolve_precision, tune_cpu_allocator
from .images import to_unit_range
from .model import BEGAN, check_resolution, default_filters
from .step import make_step

COMPILE_CHOICES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in every checkpoint)."""
    res: int = 64
    filters: int | None = None          # n; default 128 at res >= 128, else 64
    z_dim: int = 64
    h: int = 64
    batch_size: int = 16
    steps: int = 10_000
    lr: float = 1e-4
    lr_min: float = 2e-5
    lr_half_every: int = 100_000
    lr_stall: int = 0                   # halve lr after this many steps without M improving (0 = off)
    beta1: float = 0.5
    beta2: float = 0.999
    gamma: float = 0.5
    lambda_k: float = 0.001
    separate_z: bool = False
    cs_alpha: float = 0.0               # BEGAN-CS constrained-space term in D's loss (0 = off)
    pt_weight: float = 0.0              # EBGAN pulling-away term in G's loss (0 = off)
    k_init: float = 0.0                 # k_0 (the paper: 0); > 0 makes D push back on fakes from step 1
    k_min: float = 0.0                  # floor under k_t (the paper: 0)
    variant: str = "began"              # the preset the four options above came from (or "custom")
    pt_anneal_start: int = 0            # pt_weight falls linearly to 0 from this step ...
    pt_anneal_end: int = 0              # ... to this one (0 = not annealed); remedies.anneal_scale
    pt_final: float = 0.0               # the pulling-away weight the anneal ends at
    k_min_anneal_start: int = 0         # the same for the floor k_min
    k_min_anneal_end: int = 0
    ema_decay: float = 0.0              # EMA of G's weights for sampling (0 = off); remedies.GeneratorEMA
    skip: bool = False
    vanishing_residual: int = 0         # steps over which the carry goes 1 -> 0 (0 = option off)
    precision: str = "auto"             # auto | fp32 | bf16 (autocast); auto: bf16 where the hardware has it
    backend: str = "auto"               # auto | torch | triton
    device: str = "auto"
    seed: int = 0
    data: str | None = None             # None = embedded procedural faces
    n_procedural: int = 4096
    flip: bool = True
    out: str = "runs/began"
    sample_every: int = 500
    ckpt_every: int = 1000
    log_every: int = 50
    keep_ckpts: int = 3
    max_restores: int = 3               # divergence guard: restores before giving up
    on_collapse: str = "warn"           # health monitor on a suspected mode collapse: warn | stop | restore
    health_patience: int = 200          # steps a health condition must hold before a message (0 = monitor off)
    compile_step: str = "auto"          # fused step: torch.compile its forward: auto | on | off
    dist_timeout: float = 300.0         # torchrun: a rank whose step does not finish in this many s ends the run
    reference_step: bool = False        # the reference two-backward step instead of the fused one

    def __post_init__(self):
        check_resolution(self.res)
        if self.filters is None:
            self.filters = default_filters(self.res)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.compile_step, bool):  # configs written before auto existed
            self.compile_step = "auto" if self.compile_step else "off"
        if self.compile_step not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile_step!r}")
        if self.backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {', '.join(ops.BACKENDS)}")
        for name in ("sample_every", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_restores < 0:
            raise ValueError(f"max_restores must be >= 0, got {self.max_restores}")
        if self.on_collapse not in ("warn", "stop", "restore"):
            raise ValueError(f"on_collapse must be warn, stop or restore, got {self.on_collapse!r}")
        if self.cs_alpha < 0 or self.pt_weight < 0:
            raise ValueError("--cs-alpha and --pt-weight must be >= 0")
        if not 0.0 <= self.k_init <= 1.0:
            raise ValueError(f"--k-init must be in [0, 1] (k_t is clipped there), got {self.k_init}")
        if not 0.0 <= self.k_min <= 1.0:
            raise ValueError(f"--k-min must be in [0, 1] (k_t is clipped there), got {self.k_min}")
        if self.cs_alpha and self.h != self.z_dim:
            raise ValueError(f"BEGAN-CS (--cs-alpha) maps D's codes back to z, so --h must equal --z-dim "
                             f"(got h={self.h}, z_dim={self.z_dim})")
        remedies.check_anneal(self)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.pt_weight and self.batch_size < 2:
            raise ValueError("the pulling-away term (--pt-weight) compares samples: use --batch-size >= 2")
        if self.dist_timeout <= 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.health_patience < 0:
            raise ValueError(f"health_patience must be >= 0, got {self.health_patience}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vanishing_residual_on"] = self.vanishing_residual > 0
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return dev


class Trainer:
    """Owns the model, optimisers, device-resident data and BEGAN state of one run."""

    def __init__(self, cfg: TrainConfig, data: np.ndarray, log=print):
        self.cfg = cfg
        self.dist = distributed.info()
        self.log = log if self.dist.is_main else (lambda *_: None)
        self.device = distributed.local_device(resolve_device(cfg.device), self.dist)
        # bf16 autocast or fp32; cfg keeps the resolved value (checkpoints record what ran)
        cfg.precision, self.precision_why = resolve_precision(cfg.precision, self.device)
        # the backend, and why auto fell back to the reference (a start-up line, not a warning)
        self.backend, self.backend_why = ops.backend_choice(cfg.backend)
        ops.set_backend(self.backend)
        if len(data) < cfg.batch_size:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the data set ({len(data)} "
                             "images): use a smaller --batch-size or more images")
        distributed.check_batch(cfg.batch_size, self.dist, pairs=cfg.pt_weight > 0)
        torch.manual_seed(cfg.seed)
        self.model = BEGAN(cfg.res, cfg.filters, cfg.z_dim, cfg.h, skip=cfg.skip,
                           vanishing_residual=cfg.vanishing_residual > 0).to(self.device)
        self.G, self.D = self.model.G, self.model.D
        adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        if self.device.type == "cuda":
            adam["fused"] = True
        if self.dist.enabled:
            distributed.broadcast_module(self.model)
        self.opt_g = torch.optim.Adam(self.G.parameters(), **adam)
        self.opt_d = torch.optim.Adam(self.D.parameters(), **adam)
        # The whole data set on the device, uint8 NHWC; batches are gathered there.
        self.data = torch.from_numpy(np.ascontiguousarray(data)).to(self.device)
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed)
        self.k = torch.full((), float(cfg.k_init), device=self.device)  # k_0
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # divergence flag
        self.guard = DivergenceGuard(cfg.max_restores)
        self._stop_requested = False
        self.step = 0
        self.lr = cfg.lr
        self.best_m, self.best_m_step, self.lr_halvings = math.inf, 0, 0
        fixed = torch.Generator().manual_seed(cfg.seed + 1)
        self.fixed_z = (torch.rand(64, cfg.z_dim, generator=fixed) * 2 - 1).to(self.device)
        self.fixed_x = torch.randint(len(data), (min(32, len(data)),), generator=fixed)
        self._stop = False
        # Called at every log interval as hook(trainer, row) -> str | None (a message for the
        # user, also stored in the metrics row). The health monitor and the divergence guard
        # plug in here: they run on the host only when the logged scalars are read anyway.
        self.log_hooks: list = [self.guard]
        if cfg.health_patience:  # mode collapse, k_t pinned, M trend (fastbegan.health)
            from .health import HealthMonitor
            self.log_hooks.append(HealthMonitor.from_config(cfg))
        self.last_batch: dict[str, torch.Tensor] = {}  # the newest real and fake batch (device)
        self.g_ema = remedies.GeneratorEMA(self.G, cfg.ema_decay) if cfg.ema_decay else None
        # The fused single-pass step (one backward; CUDA graph on a GPU) wherever it
        # applies, the reference step otherwise (fastbegan.step); step_path says which.
        self.stepper = make_step(self)
        self.step_path = self.stepper.describe()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, torch.Tensor]:
        """One BEGAN step (:class:`fastbegan.step.Step`); returns device scalars (no host
        synchronisation)."""
        return self.stepper()

    def _set_lr(self, lr: float) -> None:
        self.lr = lr
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = lr  # Adam's moments are kept

    def _schedule_lr(self) -> None:
        cfg = self.cfg
        if cfg.lr_half_every and self.step % cfg.lr_half_every == 0:
            self._set_lr(max(self.lr * 0.5, cfg.lr_min))

    def observe_m(self, m: float) -> str | None:
        """M-stall rule (host side, at log intervals): halve lr if M stopped improving."""
        cfg = self.cfg
        if m < self.best_m * 0.99:
            self.best_m, self.best_m_step = m, self.step
        elif cfg.lr_stall and self.step - self.best_m_step >= cfg.lr_stall and self.lr > cfg.lr_min:
            self._set_lr(max(self.lr * 0.5, cfg.lr_min))
            self.lr_halvings += 1
            self.best_m, self.best_m_step = m, self.step
            return f"M stalled for {cfg.lr_stall} steps: lr halved to {self.lr:.3g}"
        return None

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = ckpt.prefixed("G.", self.G.state_dict()) | ckpt.prefixed("D.", self.D.state_dict())
        for name, opt in (("optG", self.opt_g), ("optD", self.opt_d)):
            for i, st in opt.state_dict()["state"].items():
                for key, val in st.items():
                    t[f"{name}.{i}.{key}"] = torch.as_tensor(val)
        if self.g_ema is not None:
            t.update(self.g_ema.state_tensors())
        t["state.k"] = self.k
        t["state.step"] = torch.tensor(self.step)
        t["rng.gen"] = self.gen.get_state()
        t["rng.torch"] = torch.get_rng_state()
        return t

    def host_state(self) -> dict:
        return {"lr": self.lr, "best_m": None if math.isinf(self.best_m) else self.best_m,
                "best_m_step": self.best_m_step, "lr_halvings": self.lr_halvings,
                "restores": self.guard.restores}

    def save_checkpoint(self) -> Path | None:
        """Write ``ckpt_<step>`` (rank 0; every rank must call it). Never from a diverged
        state: the divergence check runs first, and restores instead of saving."""
        if self.guard.check(self, params=True) is not None or not self.dist.is_main:
            return None
        path = ckpt.checkpoint_path(self.cfg.out, self.step)
        return ckpt.save_checkpoint(path, self.state_tensors(), self.cfg.to_dict(), self.host_state(),
                                    keep=self.cfg.keep_ckpts)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        tensors, cfg, state = ckpt.load_checkpoint(path, "cpu")
        ckpt.check_compatible(cfg, self.cfg.to_dict(), path)
        self.load_state(tensors, state)

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Set everything from checkpoint tensors + host state (see :meth:`state_tensors`)."""
        ckpt.load_into(self.G, ckpt.unprefixed("G.", tensors))
        ckpt.load_into(self.D, ckpt.unprefixed("D.", tensors))
        if self.g_ema is not None:
            self.g_ema.load(tensors)
        for name, opt in (("optG", self.opt_g), ("optD", self.opt_d)):
            sd = opt.state_dict()
            sd["state"] = {}
            for key, val in ckpt.unprefixed(f"{name}.", tensors).items():
                i, field = key.split(".", 1)
                sd["state"].setdefault(int(i), {})[field] = val
            opt.load_state_dict(sd)  # moves the moments to the parameters' device
            ckpt.match_state_layout(opt)  # ... but not to their memory format (channels_last)
        self.k = tensors["state.k"].to(self.device)
        self.step = int(tensors["state.step"])
        self.gen.set_state(tensors["rng.gen"])
        torch.set_rng_state(tensors["rng.torch"])
        self._set_lr(state.get("lr", self.cfg.lr))
        best = state.get("best_m")
        self.best_m = math.inf if best is None else best
        self.best_m_step = state.get("best_m_step", 0)
        self.lr_halvings = state.get("lr_halvings", 0)
        self.nonfinite.zero_()  # ``restores`` is not loaded: the retry budget is per launch

    # ------------------------------------------------------------------ samples
    @torch.no_grad()
    def write_samples(self) -> Path | None:
        if not self.dist.is_main:
            return None
        from .images import save_grid
        out = Path(self.cfg.out) / "samples"
        with self.autocast():
            # the EMA's samples when the run keeps one: what `fastbegan sample` will draw
            g_of = self.G if self.g_ema is None else (lambda z: self.g_ema.generate(self.G, z))
            fake = g_of(self.fixed_z).float()
            real = to_unit_range(self.data[self.fixed_x.to(self.device)]).contiguous(
                memory_format=torch.channels_last)
            rec = self.D(real).float()
        save_grid(fake, out / f"fake_{self.step:08d}.png")
        pairs = torch.stack([real, rec], 1).flatten(0, 1)  # real, recon, real, recon, ...
        return save_grid(pairs, out / f"recon_{self.step:08d}.png", nrow=8)

    # ------------------------------------------------------------------ loop
    def request_stop(self, *_):
        if self.dist.enabled:
            self._stop_requested = True  # agreed on by all ranks at the next log interval
        else:
            self._stop = True

    def fit(self, steps: int | None = None, progress: bool = True) -> list[dict]:
        """Train until ``steps`` total steps; returns the logged rows. Ctrl-C / SIGTERM save and stop."""
        cfg = self.cfg
        total = cfg.steps if steps is None else steps
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / "metrics.jsonl"
        rows = []
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        in_main = _in_main_thread()
        if in_main:
            for s in old:
                signal.signal(s, self.request_stop)
        bar = None
        self.guard.snapshot(self)
        if progress and self.dist.is_main:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True,
                       file=sys.stderr, disable=not progress)
        t_last, s_last = time.perf_counter(), self.step
        first_step = self.step
        from .tb import TBWriter
        tb = TBWriter(out / "tb") if self.dist.is_main else None  # a no-op without tensorboard
        # several processes: a rank that dies or hangs ends this one within --dist-timeout
        watchdog = (distributed.Watchdog(cfg.dist_timeout, distributed.stall_message(cfg.out))
                    if self.dist.enabled else None)
        try:
            with open(metrics_path if self.dist.is_main else os.devnull, "a") as metrics:
                self.stepper.steps_planned = total - self.step  # for --compile auto
                while self.step < total and not self._stop:
                    vals = self._one_step(bar, watchdog, first=self.step == first_step)
                    if self.step % cfg.log_every == 0 or self.step == total:
                        now = time.perf_counter()
                        row = self._log_interval(vals, (self.step - s_last) / max(now - t_last, 1e-9),
                                                 metrics, tb, bar)
                        rows.append(row)
                        t_last, s_last = now, self.step
                    if bar is not None:
                        bar.update(1)
                    if self.step % cfg.sample_every == 0:
                        self.write_samples()
                    if self.step % cfg.ckpt_every == 0:
                        if watchdog is not None:
                            watchdog.arm()  # the checkpoint gets a deadline of its own
                        self.save_checkpoint()
        finally:
            for closing in (watchdog, tb, bar):
                if closing is not None:
                    closing.close()
            if in_main:
                for s, h in old.items():
                    signal.signal(s, h)
        last = ckpt.latest_checkpoint(cfg.out)
        if last is None or not last.name.endswith(f"{self.step:08d}.safetensors"):
            self.save_checkpoint()
        if self._stop:
            self.log(f"stopped at step {self.step}; checkpoint saved. Resume with --resume.")
        else:
            self.write_samples()
        if self.dist.is_main:
            from .plots import plot_run
            try:  # RUN_DIR/metrics.png; a plotting problem never fails a finished run
                plot_run(out)
            except Exception as e:
                self.log(f"no metrics plot: {e}")
        return rows

    def _one_step(self, bar, watchdog, first: bool) -> dict[str, torch.Tensor]:
        """One training step. A step that compiles says so on the progress bar (one long step
        instead of a frozen bar); it and a launch's first step (autotuning, CUDA graph warm-up,
        NCCL set-up) get the watchdog's compile grace on top of --dist-timeout."""
        compiling = self.stepper.compiles_next
        if watchdog is not None:
            watchdog.arm(distributed.COMPILE_GRACE_S if compiling or first else 0.0)
        if compiling and bar is not None:
            bar.set_description_str("compiling (torch.compile, once)")
            bar.refresh()
        vals = self.train_step()
        if compiling and bar is not None:
            bar.set_description_str("")
        return vals

    def _log_interval(self, vals: dict[str, torch.Tensor], steps_per_s: float, metrics, tb, bar) -> dict:
        """Every ``log_every`` steps: read the scalars (the host sync), run the M-stall rule
        and the log hooks (divergence guard, health monitor), write the row everywhere."""
        row = self._log_row(vals, steps_per_s)
        notes = [self.observe_m(row["M"])] + [hook(self, row) for hook in self.log_hooks]
        notes = [n for n in notes if n]
        if notes:
            row["events"] = notes
            for note in notes:
                self.log(f"step {row['step']}: {note}")  # a hook may have restored an earlier step
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if tb is not None:
            tb.log_row(row)
        if self.dist.enabled:
            self._stop = distributed.any_true(self._stop_requested, self.device)
        if bar is not None:
            bar.set_postfix(k=f"{row['k']:.4f}", M=f"{row['M']:.4f}",
                            Lr=f"{row['loss_real']:.4f}", Lf=f"{row['loss_fake']:.4f}")
        return row

    def _log_row(self, vals: dict[str, torch.Tensor], steps_per_s: float) -> dict:
        keys = list(vals)
        # the one host synchronisation, every log_every steps
        nums = torch.stack([vals[k].float() for k in keys]).tolist()
        row = {"step": self.step, **dict(zip(keys, nums)), "lr": self.lr,
               "steps_per_s": round(steps_per_s, 3), "time": time.time()}
        return row


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after ``step`` (a killed run's tail, redone after resume)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def _startup_lines(trainer: Trainer, threads: str | None, log) -> None:
    """What the run picked and why, once (rank 0: ``log`` is a no-op elsewhere)."""
    cfg, di = trainer.cfg, trainer.dist
    log(trainer.step_path)
    log(f"device {trainer.device.type}" + (f" ({threads})" if threads else "")
        + f", backend {trainer.backend}" + (f" ({trainer.backend_why})" if trainer.backend_why else "")
        + f", precision {cfg.precision} ({trainer.precision_why}), res {cfg.res}, filters {cfg.filters}, "
        f"batch {cfg.batch_size}"
        + (f" ({cfg.batch_size // di.world} on each of {di.world} processes)" if di.enabled else ""))
    levers = remedies.lever_flags({k: getattr(cfg, k) for k in remedies.PAPER})
    log(f"variant {cfg.variant}: " + (levers or "the paper's BEGAN (no collapse remedy)")
        + f", gamma {cfg.gamma:g}, lambda_k {cfg.lambda_k:g}")


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print) -> Trainer:
    """Load data, build the trainer, resume if asked, train to ``cfg.steps``.

    Under torchrun (WORLD_SIZE > 1) this joins the process group first; only rank 0 logs."""
    from .autocompile import use_persistent_inductor_cache
    from .data import load_dataset
    di = distributed.init_from_env(cfg.device)
    use_persistent_inductor_cache()  # a second run finds its compiled step there
    threads = None
    if resolve_device(cfg.device).type == "cpu":
        threads = f"{configure_threads(di.world)}; {tune_cpu_allocator()}"
    if not di.is_main:
        log, progress = (lambda *_: None), False
    arr, report = load_dataset(cfg.data, cfg.res, n_procedural=cfg.n_procedural, seed=cfg.seed,
                               progress=progress)
    log(f"data: {report.summary()}")
    if report.unreadable:
        log(f"skipped {len(report.unreadable)} unreadable files, e.g. {report.unreadable[0]}")
    trainer = Trainer(cfg, arr, log=log)
    if resume:
        last = ckpt.latest_checkpoint(cfg.out)
        if last is None:
            log(f"no checkpoint in {cfg.out}/checkpoints: starting from scratch")
            truncate_metrics(Path(cfg.out) / "metrics.jsonl", 0)  # a run killed before its first checkpoint
        else:
            trainer.load_checkpoint(last)
            truncate_metrics(Path(cfg.out) / "metrics.jsonl", trainer.step)
            log(f"resumed from {last} at step {trainer.step}")
    elif ckpt.latest_checkpoint(cfg.out) is not None:
        raise ckpt.CheckpointError(f"{cfg.out} already holds checkpoints: pass --resume to continue "
                                   "that run, or choose another --out")
    distributed.check_same_step(trainer.step, trainer.device, "--resume" if resume else "the start")
    _startup_lines(trainer, threads, log)
    lost = False
    try:
        trainer.fit(progress=progress)
    except distributed.PeerLost as e:  # another process died: say where to resume from
        lost = True
        raise distributed.PeerLost(f"{e}. Stopping; {distributed.resume_hint(cfg.out)}") from None
    finally:
        if not lost:  # a process group with a dead member is left to the process's exit
            distributed.cleanup()
    return trainer
