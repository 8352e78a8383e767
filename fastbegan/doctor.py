"""``fastbegan doctor``: every kernel path against the torch reference, before training.

On a CUDA GPU it checks, at the real layer shapes of the model at res 64 and res 128
(batch 16; traced from :class:`fastbegan.model.BEGAN` with and without skip connections)
in bf16 and fp32, every path of every op of the triton backend:

- the forward conv on each kernel that can run the shape (``tma``: the tensor-descriptor
  kernel, with the sub-pixel upsample and, for upsample layers, also the 9-tap one;
  ``ptr``: the pointer kernel): plain, fused upsample, stride 2, C_in = 3, C_out = 3,
  skip, upsample + skip;
- its backward kernels: dgrad (x and skip) and wgrad (with a per-sample scale);
- the pair op (D's first conv on two halves) and the L1 pair op (D's last conv fused with
  both L1 losses and the BEGAN update), forward and backward, through the custom ops;
- the standalone upsample; and, with two GPUs, the ops on ``cuda:1`` (the device guard).

Each row: op, shape, path, dtype, max relative error (max |got - ref| / max |ref|, the
reference computed in fp32 from the same rounded inputs), ms per call, status. The table
is printed and written as JSON; the exit status is 1 if any row fails. On a CPU the same
matrix runs at small shapes under the Triton interpreter in fp16 and fp32 (bf16 dots are
wrong in the interpreter, docs/design.md §8).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch

from .ops import fallback, reference

CL = torch.channels_last


@dataclass(frozen=True)
class ConvCase:
    """One conv layer: x (n, c_x, h, w) (low-res for upsample), skip (n, c_s, ...) at the
    conv's input resolution, weight (c_out, c_x + c_s, 3, 3)."""
    name: str
    n: int
    c_x: int
    c_s: int
    c_out: int
    h: int
    w: int
    upsample: bool = False
    stride: int = 1
    activation: bool = True

    def shape(self) -> str:
        s = f"{self.n}x{self.c_x}x{self.h}x{self.w}"
        s += f"+skip{self.c_s}" if self.c_s else ""
        return s + f"->{self.c_out}" + ("/up" if self.upsample else "") + \
            ("/s2" if self.stride == 2 else "") + ("" if self.activation else "/linear")


@dataclass
class Row:
    op: str
    shape: str
    path: str
    dtype: str
    max_rel_err: float | None
    ms: float | None
    status: str            # pass | FAIL | ERROR | skip
    note: str = ""


def _variant(c_x, c_s, c_out, upsample, stride, activation) -> str:
    if c_s:
        return "upsample_skip" if upsample else "skip"
    if upsample:
        return "upsample"
    if stride == 2:
        return "stride2"
    if c_x == 3:
        return "c_in3"
    if c_out == 3:
        return "c_out3"
    return "plain"


def layer_cases(res: int, batch: int = 16) -> list[ConvCase]:
    """The distinct conv layers of BEGAN at ``res`` (default filters), with and without
    skip connections, traced on the meta device (no memory, no compute)."""
    from . import ops
    from .model import BEGAN
    seen: dict[tuple, ConvCase] = {}
    real = ops.conv3x3_elu

    def record(x, weight, bias, *, upsample=False, stride=1, activation=True, skip=None,
               wgrad_scale=None):
        c_s = skip.shape[1] if skip is not None else 0
        k = (x.shape[1], c_s, weight.shape[0], x.shape[2], x.shape[3], upsample, stride,
             activation)
        if k not in seen:
            seen[k] = ConvCase(_variant(k[0], c_s, k[2], upsample, stride, activation), batch,
                               *k)
        return reference.conv3x3_elu_ref(x, weight, bias, upsample=upsample, stride=stride,
                                         activation=activation, skip=skip)
    ops.conv3x3_elu = record
    try:
        with ops.use_backend("torch"), torch.no_grad():
            for skip in (False, True):
                m = BEGAN(res, skip=skip).to("meta")
                m.D(m.G(torch.zeros(batch, m.z_dim, device="meta")))
    finally:
        ops.conv3x3_elu = real
    return sorted(seen.values(), key=lambda c: (c.name, -c.h, c.c_x))


def cpu_cases() -> list[ConvCase]:
    """Every variant at interpreter-sized shapes (<= 16 channels, <= 8x8)."""
    return [ConvCase("plain", 2, 16, 0, 16, 8, 8),
            ConvCase("upsample", 2, 16, 0, 16, 4, 4, upsample=True),
            ConvCase("stride2", 2, 16, 0, 16, 8, 8, stride=2),
            ConvCase("c_in3", 2, 3, 0, 16, 8, 8),
            ConvCase("c_out3", 2, 16, 0, 3, 8, 8, activation=False),
            ConvCase("skip", 2, 16, 16, 16, 8, 8),
            ConvCase("upsample_skip", 2, 16, 16, 16, 4, 4, upsample=True)]


def _tol(dtype: torch.dtype, device: torch.device) -> float:
    """Accepted max relative error: bf16 keeps 8 mantissa bits, fp16 11; fp32 dots run in
    TF32 on a GPU (as cuDNN's default), exactly in fp32 under the interpreter."""
    if dtype == torch.float32:
        return 1e-2 if device.type == "cuda" else 1e-4
    return {torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]


def _time_ms(fn, device: torch.device) -> float:
    """ms per call on a GPU: triton's do_bench (the first call, which compiled and
    autotuned, was made already)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=3, rep=10))


STICKY_EXIT = 3  # exit status of a doctor stopped by a sticky CUDA error (run it again)


class StickyCudaError(RuntimeError):
    """A check left the CUDA context unusable: the doctor saves its table and stops (the
    path is recorded as dropped, so running the doctor again goes on past it)."""


def _check(rows, op, shape, path, dtype, device, fn, ref, time_it=True, chain=None):
    """Run ``fn`` (the path) and ``ref`` (the reference), append the row. ``chain``: the
    ``(op, key)`` under which the fallback chain knows this path, for a path it can drop:
    a path recorded as dropped by an earlier process is not run (status ``dropped``), and a
    mismatch or a sticky CUDA error is recorded for later processes (training, tests)."""
    dname = str(dtype).replace("torch.", "")
    if chain is not None:
        why = fallback.recorded_drops(device).get(fallback.variant(*chain), {}).get(path)
        if why is not None and fallback._persists(device):
            rows.append(Row(op, shape, path, dname, None, None, "dropped",
                            f"recorded by an earlier process: {why}"))
            return
    try:
        t = time.perf_counter()
        got = fn()
        ms = (time.perf_counter() - t) * 1e3      # CPU: the interpreter's cost of one call
        err = fallback.max_rel_error(got, ref())
        if device.type == "cuda":
            ms = _time_ms(fn, device) if time_it else None
    except Exception as e:  # noqa: BLE001 - reported as an ERROR row
        msg = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [""]
        note = f"{e.__class__.__name__}: {msg[-1][:160]}"
        rows.append(Row(op, shape, path, dname, None, None, "ERROR", note))
        sticky = fallback._sticky_cuda_error(device)
        if sticky is not None:
            if chain is not None:
                fallback.record_dropped(*chain, path, f"sticky CUDA error: {note}", device)
            raise StickyCudaError(f"{op} {shape} {path} {dname}: {note}; then {sticky}") from e
        return
    ok = err <= _tol(dtype, device)
    rows.append(Row(op, shape, path, dname, err, ms, "pass" if ok else "FAIL"))
    if not ok and chain is not None:
        fallback.record_dropped(*chain, path, f"doctor: max relative error {err:.3g}", device)


def _tensors(c: ConvCase, dtype, device, seed=0):
    """x, skip, weight (fp32 master, channels_last), bias, scale, dy for one case."""
    g = torch.Generator().manual_seed(seed)
    hs, ws = (2 * c.h, 2 * c.w) if c.upsample else (c.h, c.w)

    def rnd(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(device)
    x = rnd(c.n, c.c_x, c.h, c.w).to(dtype).contiguous(memory_format=CL)
    skip = rnd(c.n, c.c_s, hs, ws).to(dtype).contiguous(memory_format=CL) if c.c_s else None
    w = rnd(c.c_out, c.c_x + c.c_s, 3, 3, scale=(2.0 / (9 * (c.c_x + c.c_s))) ** 0.5)
    w = w.contiguous(memory_format=CL)
    ho, wo = (hs - 1) // c.stride + 1, (ws - 1) // c.stride + 1
    dy = rnd(c.n, c.c_out, ho, wo).to(dtype).contiguous(memory_format=CL)
    scale = torch.linspace(-1, 1, c.n, device=device)
    return x, skip, w, rnd(c.c_out, scale=0.1), scale, dy


def _f32(t):
    return None if t is None else t.float()


def check_conv(rows, c: ConvCase, dtype, device) -> None:
    """Forward on every eligible kernel path, then dgrad and wgrad, against the reference."""
    from .kernels import conv3x3, conv3x3_bwd
    from .ops import triton_conv
    x, skip, w, b, scale, dy = _tensors(c, dtype, device)
    wr = w.to(dtype).float()                       # the weights as the kernel sees them
    kw = dict(upsample=c.upsample, stride=c.stride, activation=c.activation)
    ref = lambda: reference.conv3x3_elu_ref(_f32(x), wr, b, skip=_f32(skip), **kw)  # noqa: E731
    paths = [p for p in triton_conv.forward_paths(x, w, b, skip, out=None, **kw) if p[0] != "torch"]
    if c.upsample and paths[0][0] == "tma":
        paths.insert(1, ("tma_9tap", lambda: conv3x3.conv3x3_fwd(
            x, w, b, skip=skip, kernel="tma", subpixel=False, **kw)))
    elif not any(p[0] == "tma" for p in paths):
        rows.append(Row("conv3x3_elu", c.shape(), "tma", str(dtype)[6:], None, None, "skip",
                        "not eligible here (needs sm_90+ and 16-byte aligned rows)"))
    fwd_chain = ("conv3x3_elu", fallback.shape_key(
        x=x, skip=skip, weight=w, bias=True, upsample=c.upsample, stride=c.stride,
        elu=c.activation, device=device))
    for name, fn in paths:
        _check(rows, "conv3x3_elu", c.shape(), name, dtype, device, fn, ref,
               chain=fwd_chain if name in ("tma", "ptr") else None)
    y = ref().to(dtype).contiguous(memory_format=CL) if c.activation else None
    yr = _f32(y)
    sources = [("x", x, 0, c.upsample)] + ([("skip", skip, c.c_x, False)] if c.c_s else [])
    for sname, src, c_off, up in sources:  # keys as fastbegan/ops/triton_conv_bwd.py makes them
        chain = ("conv3x3_dgrad", fallback.shape_key(dy=dy, src=src, weight=w, c_off=c_off,
                                                     elu=y is not None, upsample=up,
                                                     stride=c.stride, device=device))
        _check(rows, f"conv3x3_dgrad[{sname}]", c.shape(), "triton", dtype, device,
               lambda: conv3x3_bwd.conv3x3_dgrad(dy, y, w, src, c_off=c_off, upsample=up,
                                                 stride=c.stride),
               lambda: reference.conv3x3_dgrad_ref(dy.float(), yr, wr, src.float(), c_off, up,
                                                   c.stride), chain=chain)
    chain = ("conv3x3_wgrad", fallback.shape_key(dy=dy, x=x, skip=skip, weight=w, elu=y is not None,
                                                 scale=True, upsample=c.upsample, stride=c.stride,
                                                 device=device))
    _check(rows, "conv3x3_wgrad", c.shape(), "triton", dtype, device,
           lambda: conv3x3_bwd.conv3x3_wgrad(dy, y, x, skip, w, scale, upsample=c.upsample,
                                             stride=c.stride),
           lambda: reference.conv3x3_wgrad_ref(dy.float(), yr, _f32(x), _f32(skip), w, scale,
                                               c.upsample, c.stride), chain=chain)


def _grads(fn, leaves, dout_seed=1):
    """fn(*leaves) -> tensor or tuple (first element differentiated); (out, grads)."""
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    first = out[0] if isinstance(out, tuple) else out
    g = torch.Generator().manual_seed(dout_seed)
    dout = torch.randn(first.shape, generator=g).to(first.device, first.dtype)
    grads = torch.autograd.grad(first, leaves, dout, allow_unused=True)
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in
            ((out if isinstance(out, tuple) else (out,)) + tuple(grads))]


def _on_triton(fn):
    """``fn`` on the triton backend with the fallback chain strict (a failing kernel is an
    ERROR row, not a silent torch fallback)."""
    from . import ops

    def run(*a, **kw):
        with ops.use_backend("triton"):
            strict = fallback._strict
            fallback.set_strict(True)
            try:
                return fn(*a, **kw)
            finally:
                fallback.set_strict(strict)
    return run


def check_pair(rows, c: ConvCase, dtype, device) -> None:
    """``conv3x3_elu_pair`` (D's first conv on [x_real; G(z)]) forward and backward."""
    from . import ops
    x, _, w, b, scale, _ = _tensors(c, dtype, device, seed=3)
    xb = x.flip(0).contiguous(memory_format=CL)
    s2 = torch.cat([scale, scale])
    got = lambda: _grads(_on_triton(  # noqa: E731
        lambda a, bb, ww: ops.conv3x3_elu_pair(a, bb, ww, b, wgrad_scale=s2)), [x, xb, w])
    ref = lambda: _grads(lambda a, bb, ww: reference.conv3x3_elu_scaled_ref(  # noqa: E731
        torch.cat([a, bb]), ww, b, s2), [x.float(), xb.float(), w.to(dtype).float()])
    shape = f"2x[{c.shape()}]"
    _check(rows, "conv3x3_elu_pair (fwd+bwd)", shape, "triton", dtype, device, got, ref)


def check_l1_pair(rows, c: ConvCase, dtype, device) -> None:
    """``conv3x3_l1_pair_began`` (D's last conv + both L1 losses + the BEGAN update)."""
    from . import ops
    h, _, w, b, _, _ = _tensors(ConvCase(c.name, 2 * c.n, c.c_x, 0, c.c_out, c.h, c.w,
                                         activation=False), dtype, device, seed=5)
    g = torch.Generator().manual_seed(6)
    x_real = (torch.rand(c.n, c.c_out, c.h, c.w, generator=g) * 2 - 1).to(device)
    x_fake = (torch.rand(c.n, c.c_out, c.h, c.w, generator=g) * 2 - 1).to(device, dtype)
    k = torch.full((), 0.25, device=device)
    scale = torch.cat([torch.ones(c.n), torch.full((c.n,), -0.25)]).to(device)

    def fwd(op, cast):
        def f(hh, ww, xf):
            out = op(hh, ww, b, x_real, xf, k, 0.5, 1e-3, wgrad_scale=scale)
            return (out[0] * torch.tensor([1.0, -0.25], device=device)).sum().view(1), *out[:3]
        return lambda: _grads(f, [h.float() if cast else h, w.to(dtype).float() if cast else w,
                                  x_fake.float() if cast else x_fake])
    got = fwd(_on_triton(ops.conv3x3_l1_pair_began), False)
    ref = fwd(lambda *a, wgrad_scale: reference.conv3x3_l1_pair_began_ref(
        *a, wgrad_scale=wgrad_scale), True)
    _check(rows, "conv3x3_l1_pair_began (fwd+bwd)", f"[{c.shape()}]x2", "triton", dtype, device,
           got, ref)


def check_upsample(rows, c: ConvCase, dtype, device) -> None:
    from .kernels import conv3x3
    x = _tensors(c, dtype, device)[0]
    _check(rows, "upsample_nearest2x", c.shape().split("->")[0], "triton", dtype, device,
           lambda: conv3x3.upsample_nearest2x_fwd(x),
           lambda: reference.upsample_nearest2x_ref(x.float()))


def check_second_gpu(rows, c: ConvCase, dtype) -> None:
    """The ops on cuda:1 while cuda:0 is current (the device guard), forward + backward."""
    from . import ops
    dev = torch.device("cuda", 1)
    x, _, w, b, _, _ = _tensors(c, dtype, dev)
    got = lambda: _grads(_on_triton(lambda a, ww: ops.conv3x3_elu(a, ww, b)), [x, w])  # noqa: E731
    ref = lambda: _grads(lambda a, ww: reference.conv3x3_elu_ref(a, ww, b),  # noqa: E731
                         [x.float(), w.to(dtype).float()])
    with torch.cuda.device(0):
        _check(rows, "conv3x3_elu on cuda:1 (fwd+bwd)", c.shape(), "triton", dtype, dev, got,
               ref, time_it=False)


def run_matrix(device: torch.device, dtypes, cases: list[ConvCase], log=None,
               on_case=None) -> list[Row]:
    """Every check of the module docstring over ``cases`` and ``dtypes``; ``log(line)``
    after each case, ``on_case(rows)`` too (the command saves the JSON so far: a run cut
    short by a time limit still leaves its rows)."""
    rows: list[Row] = []
    first = next(c for c in cases if c.name == "c_in3")
    last = next(c for c in cases if c.name == "c_out3")
    try:
        for dtype in dtypes:
            for c in cases:
                n0 = len(rows)
                check_conv(rows, c, dtype, device)
                if log:
                    bad = [r.status for r in rows[n0:] if r.status not in ("pass", "skip")]
                    log(f"  {c.shape()} {str(dtype)[6:]}: {', '.join(bad) or 'pass'}")
                if on_case:
                    on_case(rows)
            check_pair(rows, first, dtype, device)
            check_l1_pair(rows, last, dtype, device)
            check_upsample(rows, next(c for c in cases if c.upsample), dtype, device)
            if device.type == "cuda" and torch.cuda.device_count() >= 2:
                check_second_gpu(rows, first, dtype)
    except StickyCudaError as e:
        e.rows = rows  # the table so far, for the command to save
        raise
    return rows


def toolchain_rows(device: torch.device) -> list[Row]:
    """What Triton needs to build its kernel launchers on a GPU (a C compiler, the Python
    headers): one ERROR row per missing piece on a GPU, naming it (every kernel would fail
    at its first launch, and each op fall back to the reference); rows of status skip on
    a CPU, where the interpreter builds nothing."""
    from .ops import launcher_toolchain_missing
    missing = launcher_toolchain_missing()
    if not missing:
        return [Row("launcher toolchain", "-", "-", "-", None, None, "pass",
                    "C compiler and Python headers found")]
    status = "ERROR" if device.type == "cuda" else "skip"
    return [Row("launcher toolchain", "-", "-", "-", None, None, status,
                f"missing {m}" + ("" if device.type == "cuda" else " (needed on a GPU only)"))
            for m in missing]


def format_table(rows: list[Row]) -> str:
    head = (f"{'op':34s} {'shape':28s} {'path':9s} {'dtype':9s} {'max rel err':>11s} "
            f"{'ms/call':>9s}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        err = "-" if r.max_rel_err is None else f"{r.max_rel_err:.2e}"
        ms = "-" if r.ms is None else f"{r.ms:.3f}"
        lines.append(f"{r.op:34s} {r.shape:28s} {r.path:9s} {r.dtype:9s} {err:>11s} {ms:>9s}  "
                     f"{r.status}{'  ' + r.note if r.note else ''}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    import triton
    env = {"device": str(device), "torch": torch.__version__, "triton": triton.__version__,
           "interpreter": device.type == "cpu"}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["gpus"] = torch.cuda.device_count()
    return env


def _reexec_under_interpreter(argv) -> int:
    """No GPU: run the doctor again in a Python with TRITON_INTERPRET=1 (it must be set
    before any kernel module is imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "fastbegan", "doctor", *argv], env=env)


@click.command()
@click.option("--out", type=click.Path(), default="doctor.json", show_default=True,
              help="JSON file with the environment and every row.")
@click.option("--res", "resolutions", type=int, multiple=True, default=(64, 128), show_default=True,
              help="GPU: the resolutions whose real layer shapes are checked.")
@click.option("--batch", type=int, default=16, show_default=True, help="GPU: batch size.")
@click.option("--dtype", "dtypes", type=click.Choice(["bf16", "fp16", "fp32"]), multiple=True,
              default=None, help="Default: bf16 and fp32 on a GPU, fp16 and fp32 on a CPU.")
@click.option("--retest", is_flag=True,
              help="Forget the kernel paths that earlier processes recorded as dropped on this "
                   "GPU (a sticky CUDA error, a wrong result) and check them again.")
def doctor(out, resolutions, batch, dtypes, retest):
    """Check every kernel path against the torch reference (run it once on a new GPU).

    Prints a table (op, shape, path, dtype, max relative error, ms per call, status),
    writes it as JSON, exits with status 1 on any mismatch. Without a GPU the same checks
    run at small shapes under the Triton interpreter."""
    from .kernels import interpreting
    cuda = torch.cuda.is_available()
    if not cuda and not interpreting():
        sys.exit(_reexec_under_interpreter(sys.argv[sys.argv.index("doctor") + 1:]
                                           if "doctor" in sys.argv else []))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dts = [names[d] for d in (dtypes or (("bf16", "fp32") if cuda else ("fp16", "fp32")))]
    if not cuda and torch.bfloat16 in dts:
        raise click.UsageError("bf16 cannot be checked under the Triton interpreter (its bf16 "
                               "tl.dot is wrong, docs/design.md §8): use --dtype fp16/fp32 on a CPU")
    cases = cpu_cases() if not cuda else _gpu_cases(resolutions, batch)
    t0 = time.perf_counter()
    env = environment(device)
    if retest:
        click.echo(f"forgot {fallback.forget_recorded(device)} recorded kernel-path drops", err=True)

    def save(rows, complete=False):
        report = {"environment": env, "complete": complete,
                  "seconds": round(time.perf_counter() - t0, 1),
                  "ok": all(r.status in ("pass", "skip") for r in rows),
                  "rows": [asdict(r) for r in rows]}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
        return report
    rows = toolchain_rows(device)
    try:
        rows += run_matrix(device, dts, cases, log=lambda m: click.echo(m, err=True),
                           on_case=lambda r: save(rows + r))
    except StickyCudaError as e:
        save(rows + e.rows)
        click.echo(format_table(rows + e.rows))
        click.echo(f"stopped: a check left the GPU unusable ({e}). The path is recorded as "
                   f"dropped on this GPU; run `fastbegan doctor` again to check the rest "
                   f"(table so far in {out})", err=True)
        sys.exit(STICKY_EXIT)
    report = save(rows, complete=True)
    click.echo(format_table(rows))
    bad = [r for r in rows if r.status not in ("pass", "skip")]
    click.echo(f"{len(rows) - len(bad)} of {len(rows)} rows pass ({report['seconds']} s); "
               f"table in {out}" + (f"; {len(bad)} FAIL/ERROR" if bad else ""))
    sys.exit(1 if bad else 0)


def _gpu_cases(resolutions, batch) -> list[ConvCase]:
    cases = []
    for res in resolutions:
        cases += layer_cases(res, batch)
    n = max(c.c_x for c in cases if c.name == "upsample")
    cases.append(ConvCase("skip", batch, n, n, n, 32, 32))   # skip without upsample
    return list(dict.fromkeys(cases))
