"""The command line, through click's CliRunner: the main paths and each bad input."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fastbegan.cli import main

TINY = ["--res", "8", "--filters", "4", "--z-dim", "8", "--h", "8", "--batch-size", "2",
        "--device", "cpu", "--no-progress", "--log-every", "1"]


@pytest.fixture
def runner(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path / "cache"))
    return CliRunner()


def run(runner, args):
    return runner.invoke(main, args, catch_exceptions=False)


def test_resume_keeps_the_precision_the_run_ran(runner, tmp_path, monkeypatch):
    """--precision auto times a bf16 conv at start-up; a resume takes the checkpoint's
    precision instead, so a timing that would choose otherwise this time (noise, another
    load) cannot change the arithmetic of a run mid-way."""
    from fastbegan import hardware
    from fastbegan.checkpoint import latest_checkpoint, read_config
    monkeypatch.setattr(hardware, "bf16_support", lambda device: (True, "test: bf16 here"))
    out = tmp_path / "run"
    monkeypatch.setattr(hardware, "bf16_conv_speedup", lambda shape: 0.5)   # auto: fp32
    assert run(runner, ["train", *TINY, "--steps", "1", "--out", str(out)]).exit_code == 0
    assert read_config(latest_checkpoint(out))["precision"] == "fp32"
    monkeypatch.setattr(hardware, "bf16_conv_speedup", lambda shape: 3.0)   # auto would pick bf16 now
    r = run(runner, ["train", *TINY, "--steps", "2", "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert "precision fp32" in r.output and read_config(latest_checkpoint(out))["precision"] == "fp32"
    # a new run still decides by timing
    r = run(runner, ["train", *TINY, "--steps", "1", "--out", str(tmp_path / "new")])
    assert read_config(latest_checkpoint(tmp_path / "new"))["precision"] == "bf16"


def test_train_sample_resume(runner, tmp_path):
    out = tmp_path / "run"
    r = run(runner, ["train", *TINY, "--steps", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "CPU" in r.output and "done: step 3" in r.output
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3]
    assert (out / "checkpoints" / "ckpt_00000003.safetensors").exists()
    assert (out / "samples" / "fake_00000003.png").exists()
    # a second run into the same folder must say --resume
    r = run(runner, ["train", *TINY, "--steps", "5", "--out", str(out)])
    assert r.exit_code == 1 and "--resume" in r.output
    r = run(runner, ["train", *TINY, "--steps", "5", "--out", str(out), "--resume"])
    assert r.exit_code == 0 and "resumed from" in r.output and "done: step 5" in r.output
    # resume with another config is refused, naming the field
    r = run(runner, ["train", "--res", "16", *TINY[2:], "--steps", "6",
                     "--out", str(out), "--resume"])
    assert r.exit_code == 1 and "res=8" in r.output
    grid = tmp_path / "g.png"
    r = run(runner, ["sample", str(out / "checkpoints" / "ckpt_00000005.safetensors"), "--n", "4",
                     "--out", str(grid)])
    assert r.exit_code == 0, r.output
    assert Image.open(grid).size == (2 + 2 * 10, 2 + 2 * 10)


def test_prepare_then_train_on_cache(runner, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (12, 10), (i * 80, 0, 0)).save(d / f"{i}.png")
    (d / "broken.jpg").write_bytes(b"xx")
    r = run(runner, ["prepare", str(d), "--res", "8", "--out", str(tmp_path / "c.npy")])
    assert r.exit_code == 0, r.output
    assert "3 images" in r.output and "1 unreadable" in r.output
    assert np.load(tmp_path / "c.npy").shape == (3, 8, 8, 3)
    r = run(runner, ["train", *TINY, "--steps", "1", "--data", str(tmp_path / "c.npy"),
                     "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output


# Bad inputs of `train` (data, res, batch, output folder, device, backend, checkpoints):
# tests/test_bad_inputs.py, one matrix.


def test_sample_missing_checkpoint(runner, tmp_path):
    r = runner.invoke(main, ["sample", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 1 and "does not exist" in r.output


def test_fastbegan_warnings_are_one_clean_line(runner, monkeypatch, tmp_path):
    """A fastbegan warning raised during a command reads as one line, ``fastbegan: ...``,
    once, without the Python source path, line number or category; a warning from fastbegan's
    code without the prefix gets it; another library's warning keeps Python's format."""
    import warnings
    from pathlib import Path

    import fastbegan.step
    import fastbegan.train

    class _Done:
        step = 0

    msg = "fastbegan: torch.compile of the training step failed (boom); eager steps, about 2x slower"

    def fake_train(cfg, **kw):
        warnings.simplefilter("always")           # the display itself must say it once
        for _ in range(2):
            warnings.warn(msg, stacklevel=1)
        warnings.warn_explicit("the fused step is off here", UserWarning, fastbegan.step.__file__, 381)
        warnings.warn_explicit("someone else's warning", UserWarning, str(tmp_path / "otherlib.py"), 7)
        return _Done()
    monkeypatch.setattr(fastbegan.train, "train", fake_train)
    with pytest.warns(UserWarning) as other:      # what Python's display (here pytest's) receives
        before = warnings.showwarning
        r = runner.invoke(main, ["train", *TINY, "--steps", "1", "--out", str(tmp_path / "r")])
        assert warnings.showwarning is before              # restored after the command
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines.count(msg) == 1, r.output
    assert "fastbegan: the fused step is off here" in lines
    assert Path(fastbegan.step.__file__).name == "step.py"
    assert not any("step.py" in ln or "test_cli.py" in ln or "Warning" in ln for ln in lines), r.output
    assert "someone else's" not in r.output     # another library's warning: passed on unchanged
    assert [(str(w.message), w.filename, w.lineno) for w in other] == [
        ("someone else's warning", str(tmp_path / "otherlib.py"), 7)]
