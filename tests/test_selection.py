"""What the trainer picks on its own: precision, threads, allocator, torch.compile (issue 15).

Each choice is checked against the rule it implements, with the hardware probes
monkeypatched where the answer would otherwise depend on this machine.
"""
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fastbegan import autocompile, compile_policy, hardware
from fastbegan import step as step_module
from fastbegan.train import TrainConfig, Trainer

CPU = torch.device("cpu")


def _trainer(tmp_path, **kw):
    cfg = dict(res=8, filters=4, z_dim=8, h=8, batch_size=2, device="cpu", backend="torch", seed=1,
               out=str(tmp_path), health_patience=0)
    cfg.update(kw)
    data = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    return Trainer(TrainConfig(**cfg), data, log=lambda *_: None)


# ------------------------------------------------------------------------- precision
@pytest.mark.parametrize("amx,avx512bf16,want", [(True, False, "bf16"), (False, True, "bf16"),
                                                 (True, True, "bf16"), (False, False, "fp32")])
def test_auto_precision_on_cpu_follows_the_bf16_units(monkeypatch, amx, avx512bf16, want):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512bf16)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: True)  # whatever CPU runs the test
    got, why = hardware.resolve_precision("auto", CPU)
    assert got == want and why.startswith("auto: ")
    found = [name for name, on in (("AMX-BF16", amx), ("AVX512-BF16", avx512bf16)) if on]
    assert why == ("auto: CPU has " + " and ".join(found) if found else
                   "auto: CPU has neither AMX-BF16 nor AVX512-BF16")


@pytest.mark.parametrize("speedup,want", [(2.0, "bf16"), (0.7, "fp32")])
def test_auto_precision_on_cpu_times_bf16_against_fp32(monkeypatch, speedup, want):
    """With the run's conv shape, a CPU's bf16 units are used only where a bf16 conv was
    measured at least 1.2x fp32's speed (a Xeon with AVX512-BF16 but no AMX ran it slower);
    the probe's side is capped at 32 and the line says what was measured."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: True)
    probed = []
    monkeypatch.setattr(hardware, "bf16_conv_speedup", lambda shape: probed.append(shape) or speedup)
    got, why = hardware.resolve_precision("auto", CPU, (16, 64, 128, 128))
    assert got == want and probed == [(16, 64, 32, 32)]
    assert why == ("auto: CPU has AVX512-BF16, a bf16 conv ran 2.0x fp32's speed here" if want == "bf16" else
                   "auto: CPU has AVX512-BF16, but a bf16 conv ran 0.70x fp32's speed here (bf16 needs "
                   "1.2x; --precision bf16 forces it)")
    assert hardware.resolve_precision("bf16", CPU, (16, 64, 32, 32))[0] == "bf16" and len(probed) == 1


def test_bf16_conv_speedup_is_a_measured_ratio():
    """The probe itself, on whatever CPU runs the tests: a positive finite ratio."""
    r = hardware.bf16_conv_speedup((2, 4, 8, 8), reps=2)
    assert 0 < r < float("inf")


def test_auto_precision_on_cpu_needs_onednn_bf16(monkeypatch):
    """bf16 units that this torch's oneDNN does not use for bf16: fp32, and the line says why."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: False)
    assert hardware.resolve_precision("auto", CPU) == (
        "fp32", "auto: CPU has AVX512-BF16, but this torch's oneDNN has no bf16 kernels for it")


@pytest.mark.parametrize("capability,want", [((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_cuda_needs_bf16_tensor_cores(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    got, why = hardware.resolve_precision("auto", torch.device("cuda"))
    assert got == want and f"sm_{capability[0]}{capability[1]}" in why


def test_forced_precision_and_bad_names():
    assert hardware.resolve_precision("fp32", CPU) == ("fp32", "--precision fp32")
    assert hardware.resolve_precision("bf16", CPU) == ("bf16", "--precision bf16")
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        hardware.resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_trainer_resolves_auto_and_checkpoints_record_what_ran(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "bf16_support", lambda device: (True, "test: bf16 here"))
    monkeypatch.setattr(hardware, "bf16_conv_speedup", lambda shape: 3.0)
    t = _trainer(tmp_path, precision="auto")
    assert t.cfg.precision == "bf16"
    assert t.precision_why == "auto: test: bf16 here, a bf16 conv ran 3.0x fp32's speed here"
    t.train_step()
    path = t.save_checkpoint()
    from fastbegan.checkpoint import load_checkpoint
    assert load_checkpoint(path)[1]["precision"] == "bf16"
    # a bf16 checkpoint resumes in fp32 (precision is not a network option) and samples
    t2 = _trainer(tmp_path / "other", precision="fp32")
    t2.load_checkpoint(path)
    assert t2.step == 1 and torch.isfinite(t2.train_step()["loss_real"])


# ------------------------------------------------------------------------- threads
def test_threads_follow_affinity_unless_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert hardware.configure_threads().startswith("1 thread (1 core in this process's CPU affinity")
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        assert "shared by 2 processes" in hardware.configure_threads(processes=2)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert "OMP_NUM_THREADS=3" in hardware.configure_threads() and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_allocator_setting_stops_the_page_faults():
    """In a fresh process: 10 rounds of allocating and freeing a 40 MB tensor (above glibc's
    largest dynamic mmap threshold, 32 MB, so by default it is mmap'd afresh and every page
    faulted in each round), then the same after tune_cpu_allocator(): the heap keeps it."""
    code = textwrap.dedent("""
        import resource, torch
        from fastbegan.hardware import tune_cpu_allocator
        def faults():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(10):
                torch.empty(10 << 20).fill_(1.0)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        before = faults()
        said = tune_cpu_allocator()
        faults()
        print(before, faults(), said)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    before, after, said = out.stdout.split(maxsplit=2)
    if "unchanged" in said:
        pytest.skip(f"not glibc here: {said.strip()}")
    pages = (40 << 20) // 4096  # one tensor
    assert int(before) > 5 * pages and int(after) < pages / 10, out.stdout


# ------------------------------------------------------------------------- torch.compile
def test_compile_rule_numbers(tmp_path, monkeypatch):
    """steps_left * t_eager * gain > compile time, with the defaults until a compiled run of
    the configuration has recorded its own compile time and gain."""
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path))
    key = "cpu|test"
    cold, gain, t_step = autocompile.CPU_COLD_COMPILE_S, autocompile.CPU_GAIN["bf16"], 0.1
    enough = int(cold / (t_step * gain)) + 10
    assert autocompile.decide(enough, t_step, "bf16", key).compile
    no = autocompile.decide(enough - 20, t_step, "bf16", key)
    assert not no.compile and "defaults" in no.why and f"{enough - 20} steps" in no.why
    # a recorded compile time (a warm cache) and gain replace the defaults
    autocompile.record(key, compile_s=cold / 10)
    autocompile.record(key, gain=gain)
    assert json.loads((tmp_path / "compile_times.json").read_text()) == {
        key: {"compile_s": round(cold / 10, 4), "gain": round(gain, 4)}}
    warm = autocompile.decide(enough // 5, t_step, "bf16", key)
    assert warm.compile and "last compiled run of this configuration" in warm.why
    # a configuration where compiling did not pay is not compiled again, however long the run
    autocompile.record(key, gain=-0.05)
    assert not autocompile.decide(10 ** 9, t_step, "bf16", key).compile


def test_compile_records_are_per_variant_and_per_code_version(monkeypatch):
    """The remedies change the compiled graph, and so does the step's code: neither may
    inherit another's recorded gain (a stale negative gain would never be measured again)."""
    dev = torch.device("cpu")
    began, escape = TrainConfig(res=8), TrainConfig(res=8, pt_weight=0.1, k_init=0.1, k_min=0.05)
    assert autocompile.config_key(began, dev) != autocompile.config_key(escape, dev)
    annealed = TrainConfig(res=8, pt_weight=0.1, k_init=0.1, k_min=0.05, pt_anneal_start=20,
                           pt_anneal_end=30)
    assert autocompile.config_key(annealed, dev) != autocompile.config_key(escape, dev)
    key = autocompile.config_key(began, dev)
    assert key.endswith(f"code {autocompile.step_code_version()}")
    autocompile.step_code_version.cache_clear()
    import fastbegan.step
    src = Path(fastbegan.step.__file__)
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: real(p) + (b"#" if p == src else b""))
    try:
        assert autocompile.config_key(began, dev) != key
    finally:
        monkeypatch.undo()
        autocompile.step_code_version.cache_clear()
    assert autocompile.config_key(began, dev) == key


def test_compile_key_holds_what_the_graph_is_made_of(monkeypatch):
    """The key changes with the GPU (name, capability), the triton version, the kernels'
    and images.py's source (code inside the graph), the backend, the per-process batch and
    the loss constants (constants of the graph); not with what stays outside it (lr, k_min)."""
    import dataclasses
    dev = torch.device("cpu")
    cfg = TrainConfig(res=8, backend="torch")
    key = autocompile.config_key(cfg, dev)
    assert f"triton {compile_policy._triton_version()}" in key and compile_policy.device_id(dev) in key
    for change in ({"gamma": 0.7}, {"lambda_k": 0.01}, {"backend": "triton"}, {"flip": False},
                   {"batch_size": 8}, {"precision": "bf16"}):
        assert autocompile.config_key(dataclasses.replace(cfg, **change), dev) != key, change
    for same in ({"lr": 1e-3}, {"k_min": 0.05}, {"ema_decay": 0.99}, {"steps": 7}):
        assert autocompile.config_key(dataclasses.replace(cfg, **same), dev) == key, same
    assert autocompile.config_key(cfg, dev, backend="triton") != key
    assert autocompile.config_key(cfg, dev, world=2) != key
    sw = dataclasses.replace(cfg, sw_weight=1.0)  # the thumbnail pyramid's scales are the graph's
    assert autocompile.config_key(dataclasses.replace(sw, sw_max_side=16), dev) != autocompile.config_key(sw, dev)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    cuda = autocompile.config_key(cfg, torch.device("cuda"))
    assert "NVIDIA H200 sm_90" in cuda
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert autocompile.config_key(cfg, torch.device("cuda")) != cuda
    monkeypatch.setattr(compile_policy, "_triton_version", lambda: "0.0")
    assert autocompile.config_key(cfg, dev) != key
    # the source of code that runs inside the graph: kernels/ and images.py
    from fastbegan import images, kernels
    for src in (Path(kernels.__file__).resolve().parent / "common.py", Path(images.__file__).resolve()):
        compile_policy.step_code_version.cache_clear()
        real = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda p, src=src: real(p) + (b"#" if p == src else b""))
        try:
            assert compile_policy.step_code_version() != key.rsplit("code ", 1)[1], src
        finally:
            monkeypatch.setattr(Path, "read_bytes", real)
            compile_policy.step_code_version.cache_clear()


def test_cuda_auto_reads_the_failure_record(tmp_path, monkeypatch):
    """On CUDA --compile auto compiles, unless this configuration's compiled step failed its
    self-check here: then it stays eager and says why (the GPU is faked: nothing runs)."""
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path))
    monkeypatch.setattr(compile_policy, "device_id", lambda d: "NVIDIA H200 sm_90")
    monkeypatch.setattr(autocompile, "_compiled", lambda fn, mode: fn)
    cfg, cuda = TrainConfig(res=8, backend="torch"), torch.device("cuda")

    def forward():
        return autocompile.CompiledForward(lambda *a: None, torch.nn.Linear(1, 1), cfg, device=cuda,
                                           backend="torch", compile="auto")
    assert forward().mode == autocompile.DEFAULT_COMPILE_MODE
    autocompile.record(forward().key(), gain=-1.0, self_check_error=3.0)
    f = forward()
    assert f.mode is None and not f.pending and "failed its self-check" in f.why
    assert not autocompile.decide(10 ** 9, 1.0, "fp32", f.key(), "cuda").compile


def test_only_a_process_first_compile_time_is_recorded(tmp_path, monkeypatch):
    """A second compilation in one process finds dynamo and inductor warm: its time is not
    what a new process pays, so it is not recorded (a gain still is)."""
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path))
    monkeypatch.setattr(compile_policy, "_compiled_here", False)
    autocompile.record_compile_time("cpu|a", 40.0)
    autocompile.record_compile_time("cpu|b", 0.1)
    autocompile.record("cpu|b", gain=0.2)
    assert autocompile.recorded("cpu|a") == {"compile_s": 40.0}
    assert autocompile.recorded("cpu|b") == {"gain": 0.2}
    assert autocompile.records_path() == tmp_path / "compile_times.json"


def test_fused_step_decides_after_timed_eager_steps(tmp_path, monkeypatch, one_thread):
    """CPU, --compile auto: eager for EAGER_PROBE_STEPS + 1 steps, then the rule; a short
    run stays eager; a long one compiles on the next call, records the compile time, and
    after GAIN_STEPS compiled steps the gain it measured."""
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compile_policy, "_compiled_here", False)  # as in a new process
    compiled = []
    monkeypatch.setattr(autocompile, "_compiled", lambda fn, mode: compiled.append(mode) or fn)
    # the step's clock: every step takes 0.5 s, eager or "compiled" (the stand-in is the eager
    # step), so the measured gain is exactly 0 whatever else the machine is doing
    clock = iter(0.5 * i for i in range(10 ** 6))
    monkeypatch.setattr(step_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    probe = autocompile.EAGER_PROBE_STEPS + 1

    short = _trainer(tmp_path / "a", precision="fp32")
    short.stepper.steps_planned = 10
    for _ in range(probe):
        assert not short.stepper.compiles_next and short.stepper.forward.mode is None
        short.train_step()
    assert "not compiled" in short.stepper.forward.why and compiled == []

    long = _trainer(tmp_path / "b", precision="fp32")
    long.stepper.steps_planned = 10 ** 9
    for _ in range(probe):
        long.train_step()
    assert long.stepper.compiles_next and compiled == [autocompile.CPU_COMPILE_MODE]  # torch backend on a CPU
    long.train_step()
    assert not long.stepper.compiles_next and long.stepper.forward.compile_s >= 0
    key = long.stepper.forward.key()
    assert autocompile.recorded(key) == {"compile_s": pytest.approx(long.stepper.forward.compile_s, abs=1e-3)}
    for _ in range(autocompile.GAIN_STEPS):
        long.train_step()
    assert set(autocompile.recorded(key)) == {"compile_s", "gain"}
    assert autocompile.recorded(key)["gain"] == 0.0  # the same step time before and after


def test_progress_bar_shows_the_compiling_phase(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(autocompile, "_compiled", lambda fn, mode: fn)
    t = _trainer(tmp_path, precision="fp32", compile_step="on", steps=2, sample_every=10 ** 6,
                 ckpt_every=10 ** 6)
    assert t.stepper.compiles_next
    t.fit(progress=True)
    assert "compiling (torch.compile, once)" in capsys.readouterr().err


def test_cli_start_up_lines_say_what_was_picked(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from fastbegan.cli import main
    monkeypatch.setattr(hardware, "bf16_conv_speedup", lambda shape: 0.5)  # a timing-free line
    args = ["train", "--res", "8", "--filters", "4", "--z-dim", "8", "--h", "8", "--batch-size", "2",
            "--steps", "2", "--device", "cpu", "--backend", "torch", "--no-progress",
            "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "fused training step" in out and "torch.compile auto" in out
    assert "precision fp32 (auto: " in out  # no bf16 units, or (the probe above) bf16 measured slower
    assert f"{torch.get_num_threads()} thread" in out and "allocator:" in out
    # the default variant, with every lever it switches on, as the options that would set them
    from fastbegan.remedies import DEFAULT_VARIANT, variant_flags
    from fastbegan.remedies import VARIANT_SUMMARY
    assert (f"variant {DEFAULT_VARIANT} ({VARIANT_SUMMARY[DEFAULT_VARIANT]}): {variant_flags(DEFAULT_VARIANT)}; "
            "gamma from 1.5, adapted to hold k_t near 0.1 (lambda_gamma 0.01), lambda_k 0.003") in out
    assert "--ema-decay 0.999" in variant_flags("settle") and "--pt-anneal 2000 2500" in variant_flags("settle")
    assert "augment-shift" not in out and "sw-max-side" not in out  # off / the default pyramid
    res = CliRunner().invoke(main, args[:-1] + [str(tmp_path / "shifted"), "--res", "16", "--augment-shift", "0.125",
                                                "--sw-max-side", "16"])
    assert res.exit_code == 0, res.output
    assert ("lambda_k 0.003; D's inputs shifted by up to 2 pixels (--augment-shift 0.125); sliced Wasserstein on "
            "thumbnails up to 16x16 (--sw-max-side 16)") in res.output
