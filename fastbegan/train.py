"""The BEGAN trainer: one run's parts and the training loop (docs/design.md §4).

:class:`Trainer` owns the model, both Adam optimisers, the data set (uint8, on the device),
the run's :class:`~fastbegan.state.TrainState` (k_t, step, lr, generator, divergence flag,
counters) and :class:`~fastbegan.state.LrSchedule`, and the checkpoint of all of them
(``state_tensors`` / ``load_state``). One step is ``train_step``: the
:class:`fastbegan.step.Step` that :func:`fastbegan.step.make_step` picked (the fused
single-pass step, or the reference step), given the run's parts explicitly
(``step_inputs``), then the lr schedule. ``fit`` is the loop: scalars read every
``log_every`` steps (the only host synchronisation), samples, atomic checkpoints with
exact resume, and the log hooks (the divergence guard, :mod:`fastbegan.guard`; the health
monitor). :func:`train` loads the data and runs a config, also under torchrun
(:mod:`fastbegan.distributed`). The config itself is :mod:`fastbegan.config`'s
(``TrainConfig``, also importable from here). User guide: docs/training.md.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import augment
from . import checkpoint as ckpt
from . import distributed
from . import ops
from . import remedies
from .config import TrainConfig  # also imported from here: fastbegan.train.TrainConfig
from .guard import DivergenceGuard
from .hardware import configure_threads, resolve_precision, tune_cpu_allocator
from .images import to_unit_range
from .model import BEGAN
from .state import LrSchedule, TrainState
from .step import StepInputs, make_step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return dev


class Trainer:
    """Owns the model, optimisers, device-resident data and training state of one run.

    ``state`` (:class:`~fastbegan.state.TrainState`) is the run's state; ``step``, ``lr``,
    ``k`` and ``gen`` read it (``step`` and ``k`` also set it, in place). ``schedule`` is
    the lr rules; ``stepper`` the step; ``log_hooks`` what runs at each log interval.
    """

    def __init__(self, cfg: TrainConfig, data: np.ndarray, log=print):
        self.cfg = cfg
        self.dist = distributed.info()
        self.log = log if self.dist.is_main else (lambda *_: None)
        self.device = distributed.local_device(resolve_device(cfg.device), self.dist)
        # bf16 autocast or fp32; cfg keeps the resolved value (checkpoints record what ran)
        asked = cfg.precision
        cfg.precision, self.precision_why = resolve_precision(cfg.precision, self.device,
                                                              (cfg.batch_size, cfg.filters, cfg.res, cfg.res))
        # auto times a conv on each CPU rank: all ranks run one precision, fp32 if any rank measured it
        if (asked == "auto" and self.device.type == "cpu" and self.dist.enabled
                and distributed.any_true(cfg.precision == "fp32", self.device)):
            if cfg.precision == "bf16":
                cfg.precision, self.precision_why = "fp32", "auto: another process measured bf16 slower"
        # the backend, and why auto fell back to the reference (a start-up line, not a warning)
        self.backend, self.backend_why = ops.backend_choice(cfg.backend)
        ops.set_backend(self.backend)
        if len(data) < cfg.batch_size:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the data set ({len(data)} "
                             "images): use a smaller --batch-size or more images")
        distributed.check_batch(cfg.batch_size, self.dist, pairs=cfg.pt_weight > 0 or cfg.ms_weight > 0 or cfg.fm_weight > 0 or cfg.sw_weight > 0,
                                group=cfg.mbstd_group)
        torch.manual_seed(cfg.seed)
        self.model = BEGAN(cfg.res, cfg.filters, cfg.z_dim, cfg.h, skip=cfg.skip,
                           vanishing_residual=cfg.vanishing_residual > 0,
                           mbstd_group=cfg.mbstd_group).to(self.device)
        self.G, self.D = self.model.G, self.model.D
        adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        if self.device.type == "cuda":
            adam["fused"] = True
        if self.dist.enabled:
            distributed.broadcast_module(self.model)
        self.opt_g = torch.optim.Adam(self.G.parameters(), **adam)
        self.opt_d = torch.optim.Adam(self.D.parameters(), **{**adam, "lr": cfg.lr * cfg.lr_d_ratio})
        # The whole data set on the device, uint8 NHWC; batches are gathered there.
        self.data = torch.from_numpy(np.ascontiguousarray(data)).to(self.device)
        self.state = TrainState(self.device, k_init=cfg.k_init, gamma=cfg.gamma, adapt_gamma=bool(cfg.k_target),
                                lr=cfg.lr, lr_d_ratio=cfg.lr_d_ratio, seed=cfg.seed)
        self.schedule = LrSchedule(cfg, self.state, (self.opt_g,), (self.opt_d,))
        self.guard = DivergenceGuard(cfg.max_restores)
        self._stop = self._stop_requested = False
        fixed = torch.Generator().manual_seed(cfg.seed + 1)
        self.fixed_z = (torch.rand(64, cfg.z_dim, generator=fixed) * 2 - 1).to(self.device)
        self.fixed_x = torch.randint(len(data), (min(32, len(data)),), generator=fixed)
        # Called at every log interval as hook(trainer, row) -> str | None (a message for the
        # user, also stored in the metrics row). The health monitor and the divergence guard
        # plug in here: they run on the host only when the logged scalars are read anyway.
        self.log_hooks: list = [self.guard]
        if cfg.health_patience:  # mode collapse, k_t pinned, M trend (fastbegan.health)
            from .health import HealthMonitor
            self.log_hooks.append(HealthMonitor.from_config(cfg))
        self.g_ema = remedies.GeneratorEMA(self.G, cfg.ema_decay) if cfg.ema_decay else None
        # The fused single-pass step (one backward; CUDA graph on a GPU) wherever it
        # applies, the reference step otherwise (fastbegan.step); step_path says which.
        self.stepper = make_step(self.step_inputs())
        self.step_path = self.stepper.describe()

    def step_inputs(self) -> StepInputs:
        """What a step works on, explicitly (for :func:`fastbegan.step.make_step`)."""
        return StepInputs(cfg=self.cfg, model=self.model, G=self.G, D=self.D, opt_d=self.opt_d,
                          opt_g=self.opt_g, data=self.data, state=self.state, dist=self.dist,
                          backend=self.backend, g_ema=self.g_ema, log=self.log)

    # the run's state as the loop, the hooks and callers read it (fastbegan.state)
    step = property(lambda self: self.state.step, lambda self, n: self.state.set_step(n))
    k = property(lambda self: self.state.k, lambda self, v: self.state.k.copy_(torch.as_tensor(v)))
    lr = property(lambda self: self.state.lr)
    gen = property(lambda self: self.state.gen)
    # the newest real and fake batch of this process (device; the health monitor reads it)
    last_batch = property(lambda self: self.stepper.last_batch)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, torch.Tensor]:
        """One BEGAN step (:class:`fastbegan.step.Step`), then the lr schedule; returns
        device scalars (no host synchronisation)."""
        vals = self.stepper()
        self.schedule.after_step()
        return vals

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor: G, D, the optimisers' state, the EMA of G and the state's."""
        return (_module_tensors(self.G, self.D, self.opt_g, self.opt_d, self.g_ema)
                | self.state.state_dict()["tensors"])

    def host_state(self) -> dict:
        """The checkpoint's JSON host state (:meth:`TrainState.state_dict`)."""
        return self.state.state_dict()["host"]

    def save_checkpoint(self) -> Path | None:
        """Write ``ckpt_<step>`` (rank 0; every rank must call it). Never from a diverged
        state: the divergence check runs first, and restores instead of saving."""
        restored = self.guard.check(self, params=True)
        if restored is not None:
            self.log(f"before the checkpoint: {restored}")
        if restored is not None or not self.dist.is_main:
            return None
        path = ckpt.checkpoint_path(self.cfg.out, self.step)
        return ckpt.save_checkpoint(path, self.state_tensors(), self.cfg.to_dict(), self.host_state(),
                                    keep=self.cfg.keep_ckpts)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        tensors, cfg, state = ckpt.load_checkpoint(path, "cpu")
        ckpt.check_compatible(cfg, self.cfg.to_dict(), path)
        self.load_state(tensors, state)

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Set everything from checkpoint tensors + host state (see :meth:`state_tensors`),
        the restore counters included (the budgets hold across resumes)."""
        _load_modules(tensors, self.G, self.D, self.opt_g, self.opt_d, self.g_ema)
        self.state.load_state_dict({"tensors": tensors, "host": state})
        self.schedule.set(self.state.lr)
        self.stepper.state_loaded()

    # ------------------------------------------------------------------ samples
    @torch.no_grad()
    def write_samples(self) -> Path | None:
        if not self.dist.is_main:
            return None
        from .images import save_grid
        out = Path(self.cfg.out) / "samples"
        with self.step_inputs().autocast():
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
        notes = [self.schedule.observe_m(row["M"])] + [hook(self, row) for hook in self.log_hooks]
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
               **({"lr_d": self.state.lr_d} if self.cfg.lr_d is not None else {}),  # --lr-d: D's own rate
               "steps_per_s": round(steps_per_s, 3), "time": time.time()}
        return row


def _module_tensors(G, D, opt_g, opt_d, g_ema) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the networks (``G.*``, ``D.*``), of both optimisers' state
    (``optG.<param index>.<field>``, ``optD...``) and of the EMA of G (``G_ema.*``)."""
    t = ckpt.prefixed("G.", G.state_dict()) | ckpt.prefixed("D.", D.state_dict())
    for name, opt in (("optG", opt_g), ("optD", opt_d)):
        for i, st in opt.state_dict()["state"].items():
            for key, val in st.items():
                t[f"{name}.{i}.{key}"] = torch.as_tensor(val)
    if g_ema is not None:
        t.update(g_ema.state_tensors())
    return t


def _load_modules(tensors: dict[str, torch.Tensor], G, D, opt_g, opt_d, g_ema) -> None:
    """Load :func:`_module_tensors`' form back (in place; the moments get their parameters'
    memory format back)."""
    ckpt.load_into(G, ckpt.unprefixed("G.", tensors))
    ckpt.load_into(D, ckpt.unprefixed("D.", tensors))
    if g_ema is not None:
        g_ema.load(tensors)
    for name, opt in (("optG", opt_g), ("optD", opt_d)):
        sd = opt.state_dict()
        sd["state"] = {}
        for key, val in ckpt.unprefixed(f"{name}.", tensors).items():
            i, field = key.split(".", 1)
            sd["state"].setdefault(int(i), {})[field] = val
        opt.load_state_dict(sd)  # moves the moments to the parameters' device
        ckpt.match_state_layout(opt)  # ... but not to their memory format (channels_last)


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
    what = remedies.VARIANT_SUMMARY.get(cfg.variant)  # a preset's, in words ("custom" has none)
    log(f"variant {cfg.variant}" + (f" ({what})" if what else "") + ": " + (levers or "no remedy")
        + (f"; gamma from {cfg.gamma:g}, adapted to hold k_t near {cfg.k_target:g} (lambda_gamma "
           f"{cfg.lambda_gamma:g})" if cfg.k_target else f"; gamma {cfg.gamma:g}") + f", lambda_k {cfg.lambda_k:g}"
        + (f"; D's inputs shifted by up to {augment.max_shift(cfg.res, cfg.augment_shift)} pixels (--augment-shift "
           f"{cfg.augment_shift:g})" if cfg.augment_shift else "")
        + (f"; sliced Wasserstein on thumbnails up to {min(cfg.res, cfg.sw_max_side)}x{min(cfg.res, cfg.sw_max_side)} "
           f"(--sw-max-side {cfg.sw_max_side})" if cfg.sw_weight and cfg.sw_max_side != remedies.SW_MAX_SIDE else ""))


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
    lost = finished = False
    try:
        trainer.fit(progress=progress)
        finished = True
    except distributed.PeerLost as e:  # another process died: say where to resume from
        lost = True
        raise distributed.PeerLost(f"{e}. Stopping; {distributed.resume_hint(cfg.out)}") from None
    finally:
        if not lost:  # a process group with a dead member is left to the process's exit
            distributed.cleanup(barrier=finished)
    return trainer
