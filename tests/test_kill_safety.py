"""Kill safety: SIGKILL a real `python -m fastbegan train` at random points (mid-checkpoint
write included), resume each time, and end bit-identical to an uninterrupted run;
SIGINT / SIGTERM save a checkpoint and exit 0."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastbegan.checkpoint import list_checkpoints, load_checkpoint
from fastbegan.data import load_procedural

STEPS = 14
ARGS = ["train", "--res", "8", "--filters", "4", "--z-dim", "8", "--h", "8", "--batch-size", "2",
        "--device", "cpu", "--backend", "torch", "--no-progress", "--log-every", "1",
        "--ckpt-every", "1", "--keep-ckpts", "3", "--sample-every", "1000", "--seed", "5"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The procedural data set the runs use (--res 8 --seed 5), drawn once for all of them."""
    d = tmp_path_factory.mktemp("cache")
    load_procedural(8, 4096, 5, d)
    return d


def env(cache, slow="0.01"):
    # slow checkpoint writes (4 KiB chunks, a pause after each): a ~50 KB checkpoint
    # takes ~0.15 s, so a kill can land while the temporary file is half written
    return {**os.environ, "FASTBEGAN_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "FASTBEGAN_TEST_SLOW_CKPT": slow}


def start(out, e, *extra, steps=STEPS):
    return subprocess.Popen([sys.executable, "-m", "fastbegan", *ARGS, "--steps", str(steps),
                             "--out", str(out), *extra], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def temp_files(out: Path):
    d = out / "checkpoints"
    return [p for p in d.iterdir() if p.name.startswith(".")] if d.is_dir() else []


def wait_for(cond, proc, timeout=180.0):  # generous: shared, loaded CI machines
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, "the run ended before the kill point: " + proc.communicate()[1][-2000:]
        assert time.monotonic() - t0 < timeout, "timed out waiting for the kill point"
        time.sleep(0.002)


def latest_step(out) -> int:
    c = list_checkpoints(out)
    return int(c[-1].name[5:13]) if c else -1


def check_all_loadable(out):
    for p in list_checkpoints(out):
        tensors, cfg, state = load_checkpoint(p)  # raises on a truncated / corrupt file
        assert int(tensors["state.step"]) == int(p.name[5:13])


def metric_rows(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in rows]


def test_sigkill_anywhere_then_resume_is_exact(tmp_path, cache):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ref = start(tmp_path / "ref", env(cache, slow="0"))  # uninterrupted, in parallel
    out = tmp_path / "killed"
    kills = []
    for i in range(4):
        proc = start(out, env(cache), "--resume")
        s0 = latest_step(out)
        if i % 2 == 0:   # during a checkpoint write: soon after a temporary file appears
            wait_for(lambda: temp_files(out), proc)
            time.sleep(rng.uniform(0, 0.05))
        else:            # anywhere: a random moment after the run has made some progress
            wait_for(lambda: latest_step(out) > s0, proc)
            time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        last = list_checkpoints(out)[-1].name if list_checkpoints(out) else None
        kills.append((last, [p.name for p in temp_files(out)]))
        check_all_loadable(out)
    assert any(tmps for _, tmps in kills), f"no kill hit a checkpoint write (seed {seed}): {kills}"
    final = start(out, env(cache), "--resume")
    assert final.wait(timeout=300) == 0, final.communicate()[1][-3000:]
    assert ref.wait(timeout=300) == 0, ref.communicate()[1][-3000:]
    assert "resumed from" in final.communicate()[1]
    check_all_loadable(out)
    assert temp_files(out) == [], "the temporary files of killed writers were not cleaned up"
    assert len(list_checkpoints(out)) == 3  # --keep-ckpts
    a, _, sa = load_checkpoint(tmp_path / "ref" / "checkpoints" / f"ckpt_{STEPS:08d}.safetensors")
    b, _, sb = load_checkpoint(out / "checkpoints" / f"ckpt_{STEPS:08d}.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # parameters, both Adam states, k_t, RNG states: bit-identical
        assert torch.equal(a[k], b[k]), f"{k} differs after kills {kills} (seed {seed})"
    assert sa == sb
    # the metrics of the killed run are the uninterrupted run's (tails cut by kills redone)
    assert metric_rows(out) == metric_rows(tmp_path / "ref")


def test_sigterm_and_sigint_save_and_exit_cleanly(tmp_path, cache):
    out = tmp_path / "run"
    for sig, extra in ((signal.SIGTERM, ()), (signal.SIGINT, ("--resume",))):
        proc = start(out, env(cache), *extra, steps=100_000)
        s0 = latest_step(out)
        wait_for(lambda: latest_step(out) > s0 + 1, proc)
        wait_for(lambda: temp_files(out), proc)  # the signal arrives during a checkpoint write
        proc.send_signal(sig)
        so, se = proc.communicate(timeout=60)
        assert proc.returncode == 0, se[-3000:]
        assert "Traceback" not in se
        assert "checkpoint saved. Resume with --resume." in se
        step = int(se.split("stopped at step ")[1].split(";")[0])
        assert f"done: step {step}" in so
        assert list_checkpoints(out)[-1].name == f"ckpt_{step:08d}.safetensors"
        check_all_loadable(out)
        assert temp_files(out) == []
