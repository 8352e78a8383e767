"""A torchrun worker for tests/test_distributed.py (not a test module itself).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distworker.py OUT JOBS_JSON

Joins the gloo process group, then runs each job (a dict: ``name``, ``steps``, TrainConfig
fields, and optionally ``fake_compile``) on a fresh Trainer built from the same data as the
test's one-process reference (:func:`data`), calling ``train_step`` directly (no files but
its own), and writes ``OUT/<name>-rank<r>.pt``: the trainer's checkpoint tensors (G, D, both
Adam states, k_t, step) and what the fused step's compile handling decided. Last,
``OUT/same_step-rank<r>.json``: the error of ranks that resumed at different steps.

``fake_compile`` stands in for torch.compile (the tests cannot afford inductor's build):
``"eager"`` runs the eager forward (a compilation that is right), ``"zero_g_on_rank1"``
gives G zero gradients on rank 1 only (a compiler bug that hits one process).
"""
from __future__ import annotations

import json
import os
import sys

import torch


def data(res: int = 8, n: int = 16) -> np.ndarray:
    """Procedural faces, not uniform noise: on noise the signs of D's last-layer L1 gradient
    can cancel exactly (a to_rgb bias gradient of 0 up to rounding, whose sign then depends on
    the summation order), and Adam's normalisation turns that rounding into a lr-sized update."""
    from fastbegan.data import procedural_faces
    return procedural_faces(n, res, seed=1)[0]


def _fake_compile(kind: str, rank: int):
    def compiled(fn, mode):
        def run(*args):
            out = fn(*args)
            if kind == "zero_g_on_rank1" and rank == 1:
                out[1].register_hook(torch.zeros_like)  # no gradient reaches G
            return out
        return run
    return compiled


def run_job(job: dict, out: str) -> None:
    from fastbegan import autocompile, distributed
    from fastbegan.train import TrainConfig, Trainer
    rank = distributed.info().rank
    job = dict(job)
    name, steps = job.pop("name"), job.pop("steps")
    fake = job.pop("fake_compile", None)
    planned = job.pop("steps_planned_by_rank", None)
    if fake:
        autocompile._compiled = _fake_compile(fake, rank)
    cfg = TrainConfig(**{"res": 8, "filters": 4, "z_dim": 8, "h": 8, "batch_size": 4, "device": "cpu",
                         "backend": "torch", "precision": "fp32", "seed": 3, "lr": 1e-3,
                         "health_patience": 0, "out": f"{out}/{name}", **job})
    t = Trainer(cfg, data(cfg.res), log=lambda *_: None)
    if planned is not None:
        t.stepper.steps_planned = planned[rank]  # --compile auto: ranks that would decide apart
    for _ in range(steps):
        vals = t.train_step()
    f = getattr(t.stepper, "forward", None)
    info = {"kind": t.stepper.kind, "loss_real": float(vals["loss_real"]), "k": float(vals["k"]),
            "mode": f and f.mode, "why": f and f.why, "self_check": f and f.self_check}
    torch.save({"tensors": t.state_tensors(), "info": info}, f"{out}/{name}-rank{rank}.pt")


def check_steps(out: str) -> None:
    """Ranks that read different checkpoints (an --out that is not shared): rank r at step r."""
    from fastbegan import distributed
    rank = distributed.info().rank
    try:
        distributed.check_same_step(rank, torch.device("cpu"), "--resume")
        msg = None
    except RuntimeError as e:
        msg = str(e)
    distributed.check_same_step(7, torch.device("cpu"), "--resume")  # the same step: no error
    with open(f"{out}/same_step-rank{rank}.json", "w") as f:
        json.dump(msg, f)


def main() -> None:
    from fastbegan import distributed
    distributed.init_from_env("cpu")
    out, jobs = sys.argv[1], json.loads(sys.argv[2])
    for job in jobs:
        run_job(job, out)
    check_steps(out)
    distributed.cleanup(barrier=True)
    # Every result is on disk. Skip the interpreter's finalisation: torch's C++ threads (gloo's,
    # the compile workers') torn down there once aborted a rank in CI ("terminate called without
    # an active exception") after all its work was done, which is not what these tests check.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
