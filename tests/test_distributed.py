"""Data-parallel training: 2 CPU processes (torchrun, gloo) = 1 process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from fastbegan.checkpoint import list_checkpoints, load_checkpoint
from fastbegan.cli import main
from fastbegan.distributed import DistInfo, check_batch

# --variant began: the pulling-away term of the default variant is computed over each
# process's own batch (pairs within it), so 2 processes would not equal 1 by design
ARGS = ["--variant", "began", "--precision", "fp32", "--res", "8", "--filters", "4", "--z-dim", "8", "--h", "8", "--batch-size", "4",
        "--device", "cpu", "--backend", "torch", "--no-progress", "--log-every", "2",
        "--ckpt-every", "4", "--sample-every", "4", "--seed", "3", "--lr", "1e-3"]
# lr 1e-3: a wrong split (e.g. no all-reduce) moves weights by ~1e-2 in 4 steps; the right one
# differs from one process by ~3e-8 (summation order).


def test_shard_rows_and_batch_check():
    assert DistInfo(0, 1).shard(4) == slice(None)
    assert [DistInfo(r, 2).shard(4) for r in (0, 1)] == [slice(0, 2), slice(2, 4)]
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        check_batch(4, DistInfo(0, 3))
    check_batch(4, DistInfo(0, 4))
    with pytest.raises(ValueError, match="--batch-size >= 8 for 4 processes"):
        check_batch(4, DistInfo(0, 4), pairs=True)


def model_tensors(path):
    tensors, cfg, state = load_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith(("G.", "D.", "state.k"))}, state


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "FASTBEGAN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # the single-process reference, in-process (also fills the data cache for the workers)
    os.environ["FASTBEGAN_CACHE"] = env["FASTBEGAN_CACHE"]
    try:
        r = CliRunner().invoke(main, ["train", *ARGS, "--steps", "6", "--out", str(tmp_path / "one")])
        assert r.exit_code == 0, r.output
    finally:
        del os.environ["FASTBEGAN_CACHE"]
    two = tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "fastbegan", "train", *ARGS, "--steps", "4", "--out", str(two)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    # rank 0 alone prints, writes metrics, samples and checkpoints
    assert p.stdout.count("done: step 4") == 1, p.stdout
    assert "(2 on each of 2 processes)" in p.stderr
    assert [json.loads(l)["step"] for l in (two / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert [c.name for c in list_checkpoints(two)] == ["ckpt_00000004.safetensors"]
    assert (two / "samples" / "fake_00000004.png").exists()
    a, _ = model_tensors(tmp_path / "one" / "checkpoints" / "ckpt_00000004.safetensors")
    b, _ = model_tensors(two / "checkpoints" / "ckpt_00000004.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # same math, other summation order: equal to fp32 rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # a 2-process checkpoint resumes in 1 process and continues the same run
    os.environ["FASTBEGAN_CACHE"] = env["FASTBEGAN_CACHE"]
    try:
        r = CliRunner().invoke(main, ["train", *ARGS, "--steps", "6", "--out", str(two), "--resume"])
        assert r.exit_code == 0, r.output
    finally:
        del os.environ["FASTBEGAN_CACHE"]
    a, _ = model_tensors(tmp_path / "one" / "checkpoints" / "ckpt_00000006.safetensors")
    b, _ = model_tensors(two / "checkpoints" / "ckpt_00000006.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
