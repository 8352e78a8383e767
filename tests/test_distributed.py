"""Data-parallel training on CPU processes (gloo): 2 processes x B/2 rows = 1 process x B.

Both steps (the fused single-pass step, the default, and the reference step) under torchrun
against one process with the same global batch; the ranks against each other (bit-identical:
one all-reduce gives every rank the same gradients, losses, k_t and Adam steps); one
decision for all ranks where a rank could decide alone (--compile auto, the compile
self-check); checkpoints resumed on another number of processes; a rank killed or stopped
mid-run. Every subprocess has a timeout.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from distworker import data
from fastbegan import autocompile
from fastbegan.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from fastbegan.cli import main
from fastbegan.distributed import DistInfo, check_batch
from fastbegan.train import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent
# --variant began: the pulling-away term of the default variant is computed over each
# process's own batch (pairs within it), so 2 processes would not equal 1 by design
ARGS = ["--variant", "began", "--precision", "fp32", "--res", "8", "--filters", "4", "--z-dim", "8", "--h", "8",
        "--batch-size", "4", "--device", "cpu", "--backend", "torch", "--no-progress", "--log-every", "2",
        "--ckpt-every", "4", "--sample-every", "4", "--seed", "3", "--lr", "1e-3"]
# lr 1e-3: a wrong split (e.g. no all-reduce) moves weights by ~1e-2 in 4 steps; the right one
# differs from one process by ~3e-7 (summation order). Tolerance: 1e-5 relative, 1e-6 absolute.
TOL = dict(rtol=1e-5, atol=1e-6)
ESCAPE = {"pt_weight": 0.1, "k_init": 0.1, "k_min": 0.05, "variant": "escape"}


def _env(tmp_path) -> dict:
    return {**os.environ, "FASTBEGAN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


def _torchrun(args, env, timeout=150) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _cli(args, tmp_path):
    """``fastbegan train`` in this process (one process), with the tests' cache."""
    old = os.environ.get("FASTBEGAN_CACHE")
    os.environ["FASTBEGAN_CACHE"] = str(tmp_path / "cache")
    try:
        r = CliRunner().invoke(main, ["train", *args])
    finally:
        os.environ.pop("FASTBEGAN_CACHE") if old is None else os.environ.__setitem__("FASTBEGAN_CACHE", old)
    assert r.exit_code == 0, r.output
    return r


def test_shard_rows_and_batch_check():
    assert DistInfo(0, 1).shard(4) == slice(None)
    assert [DistInfo(r, 2).shard(4) for r in (0, 1)] == [slice(0, 2), slice(2, 4)]
    assert DistInfo(0, 1, group=True).enabled  # a group of one process all-reduces too
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        check_batch(4, DistInfo(0, 3))
    check_batch(4, DistInfo(0, 4))
    with pytest.raises(ValueError, match="--batch-size >= 8 for 4 processes"):
        check_batch(4, DistInfo(0, 4), pairs=True)
    check_batch(8, DistInfo(0, 2), group=4)  # each process's 4 rows are one minibatch-stddev group
    with pytest.raises(ValueError, match="--mbstd-group 4 must divide each process's batch"):
        check_batch(8, DistInfo(0, 4), group=4)


def test_gradsync_layout_is_fixed_when_ranks_disagree_on_none_grads():
    """GradSync's buffer has a slot for every parameter: a rank whose parameter got no
    gradient (None) all-reduces zeros there and gets the average back as its gradient, so
    both ranks reduce buffers of the same size, slot for slot. Two ranks are two threads
    here, the all-reduce a sum over their buffers (it refuses buffers of different sizes,
    as NCCL and gloo do not: they would mix one parameter with another)."""
    import threading
    from fastbegan.distributed import GradSync
    barrier, bufs = threading.Barrier(2), {}

    def all_reduce(rank):
        def reduce(t):
            bufs[rank] = t
            barrier.wait()
            if bufs[0].shape != bufs[1].shape:
                raise RuntimeError(f"all-reduce of different sizes: {bufs[0].shape} vs {bufs[1].shape}")
            total = bufs[0] + bufs[1]
            barrier.wait()
            t.copy_(total)
        return reduce

    shapes = [(4, 3, 3, 3), (4,), (2, 5)]
    grads = {r: [torch.full(s, float(10 * r + i + 1)) for i, s in enumerate(shapes)] for r in (0, 1)}
    grads[1][1] = None  # rank 1: the middle parameter took no part in its loss
    params, losses, out = {}, {0: torch.tensor([1.0, 2.0]), 1: torch.tensor([3.0, 4.0])}, {}
    for r in (0, 1):
        params[r] = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        params[r][0].data = params[r][0].data.contiguous(memory_format=torch.channels_last)
        for p, g in zip(params[r], grads[r]):
            p.grad = None if g is None else torch.empty_like(p).copy_(g)  # in its parameter's layout

    def run(r):
        out[r] = GradSync(params[r], world=2, all_reduce=all_reduce(r))(losses[r])
    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    for r in (0, 1):
        assert torch.equal(out[r], torch.tensor([2.0, 3.0]))  # the losses' average
        want = [(grads[0][i] + (0 if grads[1][i] is None else grads[1][i])) / 2 for i in range(3)]
        for i, (p, w) in enumerate(zip(params[r], want)):
            assert p.grad is not None and torch.equal(p.grad, w), (r, i)
            assert p.grad.stride() == p.stride()  # a materialised gradient has its parameter's layout
    assert torch.equal(params[1][1].grad, torch.full((4,), 1.0))  # rank 0's 2, averaged with rank 1's zeros


# ---------------------------------------------------------------------------- the steps
JOBS = [
    {"name": "fused", "steps": 4, "compile_step": "off"},
    {"name": "reference", "steps": 4, "reference_step": True},
    {"name": "escape", "steps": 4, "compile_step": "off", **ESCAPE},
    # rank 0 would compile (a long run), rank 1 would not (no steps left): rank 0 decides
    {"name": "auto", "steps": 6, "compile_step": "auto", "fake_compile": "eager",
     "steps_planned_by_rank": [10 ** 9, 0]},
    # the compilation gives G zero gradients on rank 1 only: both ranks drop it
    {"name": "selfcheck", "steps": 3, "compile_step": "on", "fake_compile": "zero_g_on_rank1"},
]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every job of JOBS run once by 2 processes (one torchrun launch)."""
    tmp = tmp_path_factory.mktemp("dist")
    _torchrun([str(HERE / "distworker.py"), str(tmp), json.dumps(JOBS)], _env(tmp))
    out = {job["name"]: [torch.load(tmp / f"{job['name']}-rank{r}.pt") for r in (0, 1)] for job in JOBS}
    out["same_step"] = [json.loads((tmp / f"same_step-rank{r}.json").read_text()) for r in (0, 1)]
    return out


def _one_process(tmp_path, steps, **cfg):
    """The same run in this process, with the global batch (the reference)."""
    cfg = {"res": 8, "filters": 4, "z_dim": 8, "h": 8, "batch_size": 4, "device": "cpu", "backend": "torch",
           "precision": "fp32", "seed": 3, "lr": 1e-3, "health_patience": 0, "out": str(tmp_path), **cfg}
    t = Trainer(TrainConfig(**cfg), data(), log=lambda *_: None)
    for _ in range(steps):
        t.train_step()
    return t.state_tensors()


def _learnt(tensors):
    """Parameters, both Adam states (moments, step counts) and k_t."""
    return {k: v for k, v in tensors.items() if k.startswith(("G.", "D.", "optG.", "optD.", "state.k"))}


def _assert_ranks_identical(ranks):
    a, b = (_learnt(r["tensors"]) for r in ranks)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the ranks"


@pytest.mark.parametrize("name,kw", [("fused", {"compile_step": "off"}), ("reference", {"reference_step": True})])
def test_two_processes_equal_one(two_ranks, tmp_path, name, kw):
    """--variant began, fp32: 2 processes x 2 rows == 1 process x 4 rows after 4 steps (every
    parameter, both Adam states, k_t; summation order only), and the ranks are bit-identical."""
    ranks = two_ranks[name]
    assert ranks[0]["info"]["kind"] == name
    _assert_ranks_identical(ranks)
    want = _learnt(_one_process(tmp_path, 4, **kw))
    got = _learnt(ranks[0]["tensors"])
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=k)
    # not trivially equal: the model moved, and k_t is off its start
    assert float(want["state.k"]) != 0.0


def test_escape_variant_runs_and_ranks_agree(two_ranks, tmp_path):
    """--variant escape (the pulling-away term per process, so not equal to one process by
    design) trains, finite, with the ranks bit-identical."""
    ranks = two_ranks["escape"]
    _assert_ranks_identical(ranks)
    assert all(torch.isfinite(v).all() for v in _learnt(ranks[0]["tensors"]).values())
    assert ranks[0]["info"]["k"] >= 0.05  # the floor


def test_compile_decisions_are_made_once_for_all_ranks(two_ranks):
    """--compile auto: rank 0's decision holds on rank 1, which alone would not have
    compiled. The compile self-check: a compilation wrong on rank 1 only is dropped on both."""
    auto = [r["info"] for r in two_ranks["auto"]]
    assert [i["mode"] for i in auto] == [autocompile.CPU_COMPILE_MODE] * 2, auto
    assert "rank 0's decision" in auto[1]["why"] and "rank 0" not in auto[0]["why"]
    _assert_ranks_identical(two_ranks["auto"])
    check = [r["info"] for r in two_ranks["selfcheck"]]
    assert [i["mode"] for i in check] == [None, None], check
    assert "another process" in check[0]["why"] and "G." in check[1]["why"]
    assert check[1]["self_check"][1] == 1.0 and check[0]["self_check"][1] < 1e-3
    _assert_ranks_identical(two_ranks["selfcheck"])


def test_ranks_at_different_steps_stop_with_a_message(two_ranks):
    """Rank 0 writes the checkpoints and every rank reads them: ranks that resume (or restore)
    at different steps, as on machines without a shared --out, stop the run, on every rank."""
    msgs = two_ranks["same_step"]
    assert all(m and "different steps (0 to 1)" in m and "shared file system" in m for m in msgs), msgs


# ---------------------------------------------------------------------------- the command
def _model(path):
    tensors, _, _ = load_checkpoint(path)
    return _learnt(tensors)


def test_cli_resumes_on_another_number_of_processes(tmp_path):
    """`torchrun ... -m fastbegan train` runs the fused step (rank 0 alone prints and writes);
    a 2-process checkpoint continues in 1 process, a 1-process one in 2, both equal to an
    uninterrupted 1-process run."""
    env = _env(tmp_path)
    _cli([*ARGS, "--steps", "6", "--out", str(tmp_path / "one")], tmp_path)
    one = tmp_path / "one" / "checkpoints"
    two = tmp_path / "two"
    p = _torchrun(["-m", "fastbegan", "train", *ARGS, "--steps", "4", "--out", str(two)], env)
    assert p.stderr.count("fused training step (single-pass step") == 1, p.stderr
    assert "2 processes, one all-reduce" in p.stderr and "(2 on each of 2 processes)" in p.stderr
    assert p.stdout.count("done: step 4") == 1, p.stdout
    assert "Warning" not in p.stderr, p.stderr
    assert [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert [c.name for c in list_checkpoints(two)] == ["ckpt_00000004.safetensors"]
    assert (two / "samples" / "fake_00000004.png").exists()
    a, b = _model(one / "ckpt_00000004.safetensors"), _model(two / "checkpoints" / "ckpt_00000004.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], **TOL, msg=k)
    want = _model(one / "ckpt_00000006.safetensors")
    # 2 processes -> 1
    _cli([*ARGS, "--steps", "6", "--out", str(two), "--resume"], tmp_path)
    # 1 process -> 2
    three = tmp_path / "three" / "checkpoints"
    three.mkdir(parents=True)
    shutil.copy(one / "ckpt_00000004.safetensors", three)
    _torchrun(["-m", "fastbegan", "train", *ARGS, "--steps", "6", "--out", str(three.parent), "--resume"], env)
    for got in (_model(latest_checkpoint(two)), _model(latest_checkpoint(three.parent))):
        for k in want:
            torch.testing.assert_close(got[k], want[k], **TOL, msg=k)


# ---------------------------------------------------------------------------- faults
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_lost_rank_ends_the_other_with_a_message(tmp_path, fault):
    """Rank 1 is SIGKILLed (dies) or SIGSTOPped (hangs) mid-run. Rank 0 exits non-zero within
    --dist-timeout with one 'Error:' line that names the last checkpoint, which is intact.
    Launched without torchrun (whose agent would end the survivor itself)."""
    timeout = 8
    env = {**_env(tmp_path), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastbegan", "train", *ARGS, "--steps", "100000", "--log-every", "1",
           "--ckpt-every", "2", "--sample-every", "100000", "--compile", "off", "--dist-timeout", str(timeout),
           "--out", str(out)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while len(list_checkpoints(out)) < 1 or ckpt_rows(out) < 3:
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 30)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err[-2000:]
    assert ("lost contact" if fault == "kill" else f"no training step finished within {timeout} s") in errors[0]
    assert "the last checkpoint" in errors[0] and "resume with --resume" in errors[0]
    assert waited < timeout + 15, waited
    load_checkpoint(latest_checkpoint(out))  # intact


def ckpt_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0
