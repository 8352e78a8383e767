"""Bad inputs through the CLI, as one matrix: each ends in one clear line (no traceback)
and leaves no partial output; the recoverable ones train and say what they did."""
import errno
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner

from fastbegan import checkpoint as ckpt
from fastbegan import ops
from fastbegan.cli import main
from test_data import write_images

TINY = ["--res", "8", "--filters", "4", "--z-dim", "8", "--h", "8", "--batch-size", "2",
        "--no-progress", "--log-every", "1", "--steps", "1"]
GOOD = [("g1.png", "RGB", (20, 16)), ("g2.jpg", "RGB", (16, 16))]


def folder(tmp_path, specs):
    write_images(tmp_path / "imgs", specs)
    return ["--data", str(tmp_path / "imgs")]


def no_gpu_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # judge Triton as on a real machine
    monkeypatch.setattr(ops, "_warned", False)


def triton_missing(monkeypatch):
    no_gpu_triton(monkeypatch)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError


def triton_too_old(monkeypatch):
    no_gpu_triton(monkeypatch)
    import triton
    monkeypatch.setattr(triton, "__version__", "2.0.0")


def disk_full(tmp_path, monkeypatch):
    """The 2nd checkpoint write fills the disk half way through."""
    real, calls = ckpt._write_file, []

    def write(path, data):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)
    monkeypatch.setattr(ckpt, "_write_file", write)
    return ["--steps", "3", "--ckpt-every", "1"]


def other_res_checkpoint(tmp_path):
    cfg = {"res": 16, "filters": 4, "z_dim": 8, "h": 8, "skip": False, "vanishing_residual_on": False}
    ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path / "out", 5), {"state.step": torch.tensor(5)}, cfg)
    return ["--resume"]


def truncated_checkpoint(tmp_path):
    other_res_checkpoint(tmp_path)
    p = ckpt.checkpoint_path(tmp_path / "out", 5)
    p.write_bytes(p.read_bytes()[:100])
    return ["--resume"]


def unwritable_out(tmp_path):
    (tmp_path / "file").write_text("x")  # (as root, chmod does not stop writes: a file as parent does)
    return ["--out", str(tmp_path / "file" / "sub")]


# id: (setup(tmp_path, monkeypatch) -> extra args, expected exit code, texts the output must hold)
CASES = {
    "missing_dir": (lambda t, m: ["--data", "/nonexistent/folder"], 1, ["does not exist"]),
    "empty_dir": (lambda t, m: folder(t, []), 1, ["holds no images"]),
    "only_corrupt": (lambda t, m: folder(t, [("a.jpg", "corrupt", None), ("b.png", "corrupt", None)]),
                     1, ["none of the 2 image files", "could be read"]),
    "mixed_corrupt_good": (lambda t, m: folder(t, GOOD + [("bad.jpg", "corrupt", None)]), 0,
                           ["1 unreadable skipped", "skipped 1 unreadable files", "done: step 1"]),
    "grayscale": (lambda t, m: folder(t, [("a.png", "L", (16, 16)), ("b.jpg", "L", (9, 12))]), 0,
                  ["2 converted to RGB", "done: step 1"]),
    "rgba": (lambda t, m: folder(t, [("a.png", "RGBA", (16, 16)), ("b.png", "RGBA", (8, 8))]), 0,
             ["2 converted to RGB", "done: step 1"]),
    "16bit": (lambda t, m: folder(t, [("a.png", "I;16", (16, 16)), ("b.png", "I;16", (12, 8))]), 0,
              ["2 converted to RGB", "done: step 1"]),
    "smaller_than_res": (lambda t, m: folder(t, [("a.png", "RGB", (4, 4)), ("b.png", "RGB", (3, 5))]), 0,
                         ["2 smaller than res, upscaled", "done: step 1"]),
    "res_12": (lambda t, m: ["--res", "12"], 1, ["power of two"]),
    "res_512": (lambda t, m: ["--res", "512"], 1, ["power of two"]),
    "batch_absurd": (lambda t, m: ["--batch-size", "100000"], 1, ["larger than the data set"]),
    "batch_0": (lambda t, m: ["--batch-size", "0"], 1, ["batch size must be >= 1"]),
    "lr_d_0": (lambda t, m: ["--lr-d", "0"], 1, ["learning rates must be > 0"]),
    "mbstd_group_3": (lambda t, m: ["--mbstd-group", "3"], 1, ["--mbstd-group must be 0 (off) or divide"]),
    "fm_data_codes": (lambda t, m: ["--variant", "began", "--fm-weight", "0.1", "--fm-data"], 1, ["use it with --fm-weight > 0 and --fm-pixels"]),
    "sw_negative": (lambda t, m: ["--sw-weight", "-1"], 1, ["--sw-weight must be >= 0"]),
    "sw_max_side_12": (lambda t, m: ["--sw-max-side", "12"], 1, ["--sw-max-side is the largest thumbnail side", "power of two"]),
    "augment_shift_half": (lambda t, m: ["--augment-shift", "0.5"], 1, ["--augment-shift is the largest shift", "[0, 0.5)"]),
    "sw_batch_1": (lambda t, m: ["--variant", "began", "--sw-weight", "1", "--batch-size", "1"], 1, ["use --batch-size >= 2"]),
    "unwritable_out": (lambda t, m: unwritable_out(t), 1, ["cannot write to output folder"]),
    "disk_full": (disk_full, 1, ["disk is full", "previous checkpoints are intact"]),
    "checkpoint_other_res": (lambda t, m: other_res_checkpoint(t), 1, ["res=16 (this run: 8)"]),
    "checkpoint_truncated": (lambda t, m: truncated_checkpoint(t), 1, ["unreadable or truncated"]),
    "no_gpu": (lambda t, m: ["--device", "cuda"], 1, ["no CUDA GPU"]),
    "triton_on_cpu": (lambda t, m: no_gpu_triton(m) or ["--backend", "triton"], 1,
                      ["triton backend cannot run here", "no CUDA GPU is available"]),
    "triton_missing": (lambda t, m: triton_missing(m) or ["--backend", "triton"], 1,
                       ["Triton is not importable", "--backend torch"]),
    "triton_too_old": (lambda t, m: triton_too_old(m) or ["--backend", "triton"], 1,
                       ["Triton 2.0.0 is too old"]),
    # auto falls back to the reference and says why on the start-up line (not as a warning)
    "triton_missing_auto": (lambda t, m: triton_missing(m) or ["--backend", "auto"], 0,
                            ["backend torch (Triton is not importable", "done: step 1"]),
    "triton_too_old_auto": (lambda t, m: triton_too_old(m) or ["--backend", "auto"], 0,
                            ["backend torch (Triton 2.0.0 is too old", "done: step 1"]),
}


def files_under(p):
    return sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()) if p.exists() else []


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path / "cache"))
    setup, code, texts = CASES[case]
    out = tmp_path / "out"
    extra = setup(tmp_path, monkeypatch)
    before = files_under(out)
    args = ["train", *TINY, "--out", str(out), *extra]
    if "--device" not in extra:
        args += ["--device", "cpu"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, args)
    assert not [w for w in caught if "fastbegan" in str(w.message)], [str(w.message) for w in caught]
    assert r.exit_code == code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    for t in texts:
        assert t in r.output, r.output
    errors = [l for l in r.output.splitlines() if l.startswith("Error:")]
    if code == 0:
        assert not errors and ckpt.latest_checkpoint(out) is not None
        return
    assert len(errors) == 1 and all(t in errors[0] for t in texts), r.output  # one clear line
    # no partial output: a failed run leaves the folder as it found it ...
    if case == "disk_full":  # ... except the checkpoint written before the disk filled up
        assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt_00000001.safetensors"]
        ckpt.load_checkpoint(ckpt.latest_checkpoint(out))  # intact
        assert [f for f in files_under(out) if ".tmp" in f] == []
    else:
        assert files_under(out) == before
        if not before:
            assert not out.exists()
