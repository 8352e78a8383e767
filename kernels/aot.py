"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90), without a GPU.

Used by tests/test_sm90_compile_fwd.py to check that every shipped autotune config compiles
for the H100 without register spills and within its shared-memory limit (docs/design.md §8).

    from fastbegan.kernels.aot import compile_for_sm90, sm90_unavailable_reason
    res = compile_for_sm90(my_kernel,                       # @triton.jit fn (or autotuned)
                           {"x_ptr": "*bf16", "n": "i32"},  # every non-constexpr argument
                           {"BLOCK": 128},                  # every constexpr argument
                           num_warps=4, num_stages=3)
    res["registers"], res["spill_bytes"], res["shared_bytes"]

``compile_for_sm90`` returns a dict:

- ``registers``: registers per thread;
- ``spill_stores`` / ``spill_loads``: bytes, from ``ptxas -v`` (``None`` if that could not
  be run), and ``spill_bytes``: their sum, or the cubin's local memory when ptxas is missing;
- ``local_bytes`` / ``stack_bytes``: per-thread local memory and stack from the cubin;
- ``shared_bytes``: shared memory per block (Triton's dynamic allocation + static);
- ``num_warps``, ``num_stages``, ``name``, ``triton_version``, ``uses_wgmma``, ``uses_tma``
  (whether the SASS-level PTX contains wgmma / cp.async.bulk.tensor instructions).

Resources are read with the ``cuobjdump --dump-resource-usage`` and ``ptxas -v`` that ship
in Triton's wheel (``triton/backends/nvidia/bin``). With Triton 3.9 the plain ``ptxas`` there
rejects Triton's PTX for sm_90; ``ptxas-blackwell`` accepts it (Triton itself picks it for
arch >= 90), so both are tried.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import triton

H100_MAX_SHARED_BYTES = 232448          # 227 KB: the per-block opt-in limit on sm_90
H100_MAX_REGISTERS = 255

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _tool(name: str) -> str | None:
    path = os.path.join(_BIN, name)
    return path if os.path.exists(path) else None


def _jit_fn(fn):
    """Unwrap @triton.autotune / @triton.heuristics down to the JITFunction."""
    from triton.runtime.jit import JITFunction
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"compile_for_sm90 needs a @triton.jit function, got {type(fn).__name__} "
                        "(under TRITON_INTERPRET=1 kernels are interpreter objects: compile in a "
                        "process without it)")
    return fn


def sm90_target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


def sm90_unavailable_reason() -> str | None:
    """None if this Triton can compile for sm_90 here, else a sentence saying why not."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # pragma: no cover - very old / broken triton
        return f"this Triton ({triton.__version__}) has no ASTSource/GPUTarget AOT API: {e}"
    if _tool("ptxas") is None and _tool("ptxas-blackwell") is None:
        return f"no ptxas in the Triton wheel ({_BIN})"
    try:
        import triton.language as tl

        @triton.jit
        def _probe(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))

        compile_for_sm90(_probe, {"x_ptr": "*fp32"}, {"BLOCK": 32}, num_warps=1, num_stages=1)
    except Exception as e:
        return (f"Triton {triton.__version__} cannot compile a probe kernel for sm_90 on this "
                f"machine: {e.__class__.__name__}: {str(e).strip().splitlines()[0][:300]}")
    return None


def _cache_path(ptx: str) -> str:
    return os.path.join(tempfile.gettempdir(), "fastbegan_ptxas_cache",
                        hashlib.sha256(ptx.encode()).hexdigest()[:40] + ".json")


def _cache_store(ptx: str, report: dict) -> None:
    path = _cache_path(ptx)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + f".{os.getpid()}", "w") as f:
            json.dump(report, f)
        os.replace(path + f".{os.getpid()}", path)
    except OSError:
        pass


def _parse_ptxas_log(log: str) -> dict:
    out = {}
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["registers"] = int(m.group(1))
    return out


def _ptxas_report(ptx: str) -> dict:
    """ptxas -v report (registers, spill bytes) of the PTX, cached on disk by the PTX's
    hash; runs ptxas when not cached. Empty dict on failure."""
    try:
        with open(_cache_path(ptx)) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    out = _run_ptxas(ptx)
    if out:
        _cache_store(ptx, out)
    return out


def _run_ptxas(ptx: str) -> dict:
    for name in ("ptxas-blackwell", "ptxas"):
        exe = _tool(name)
        if exe is None:
            continue
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            r = subprocess.run([exe, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(d, "k.o")],
                               capture_output=True, text=True)
        if r.returncode != 0:
            continue
        return _parse_ptxas_log(r.stdout + r.stderr)
    return {}


def _cuobjdump_report(cubin: bytes) -> dict:
    """REG / SHARED / LOCAL / STACK of the cubin's kernel via cuobjdump."""
    exe = _tool("cuobjdump")
    if exe is None:
        return {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        r = subprocess.run([exe, "--dump-resource-usage", path], capture_output=True, text=True)
    out = {}
    for key in ("REG", "SHARED", "LOCAL", "STACK"):
        m = re.search(rf"\b{key}:(\d+)", r.stdout)
        if m:
            out[key] = int(m.group(1))
    return out


def compile_for_sm90(jit_fn, signature: dict, constexprs: dict, num_warps: int = 4,
                     num_stages: int = 3, divisible_by_16=(), run_ptxas: bool = True) -> dict:
    """Compile ``jit_fn`` ahead of time for ``GPUTarget("cuda", 90, 32)`` and read its resources.

    jit_fn: a ``@triton.jit`` function (autotune/heuristics wrappers are unwrapped).
    signature: ``{arg name: type}`` for every non-constexpr argument, types as Triton spells
    them (``"*bf16"``, ``"*fp32"``, ``"i32"``, ``"fp32"``...).
    constexprs: ``{arg name: value}`` for every constexpr argument (autotune config kwargs
    included).
    divisible_by_16: argument names to mark 16-divisible (pointers 16-byte aligned, strides
    and sizes multiples of 16), as Triton's launcher does at run time for such values; it
    affects vectorisation and therefore registers. Defaults to none.
    run_ptxas: also run ``ptxas -v`` for exact spill bytes (costs one more ptxas run).
    Returns the dict described in the module docstring.
    """
    from triton.compiler import ASTSource

    fn = _jit_fn(jit_fn)
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"compile_for_sm90({fn.__name__}): no type or value for {missing}")
    attrs = {}
    for name in divisible_by_16:
        attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature={a: sig[a] for a in fn.arg_names}, constexprs=dict(constexprs),
                    attrs=attrs)
    # Triton runs `ptxas -v` itself; with TRITON_DUMP_PTXAS_LOG it prints the log, which we
    # capture (no second ptxas run). On a Triton cache hit there is no log: then the report
    # comes from our own cache, or one more ptxas run.
    log = io.StringIO()
    old = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=sm90_target(),
                                      options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        if old is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = old
    md = compiled.metadata
    cubin = compiled.asm["cubin"]
    ptx = compiled.asm.get("ptx", "")
    cu = _cuobjdump_report(cubin)
    px = {}
    if run_ptxas:
        px = _parse_ptxas_log(log.getvalue())
        if "spill_stores" in px:
            _cache_store(ptx, px)
        else:
            px = _ptxas_report(ptx)
    dyn_shared = int(getattr(md, "shared", 0) or 0)
    res = {
        "name": getattr(md, "name", fn.__name__),
        "triton_version": triton.__version__,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "registers": cu.get("REG", px.get("registers")),
        "shared_bytes": dyn_shared + cu.get("SHARED", 0),
        "local_bytes": cu.get("LOCAL"),
        "stack_bytes": cu.get("STACK"),
        "spill_stores": px.get("spill_stores"),
        "spill_loads": px.get("spill_loads"),
        "uses_wgmma": "wgmma" in ptx,
        "uses_tma": "cp.async.bulk.tensor" in ptx,
        "kloop_casts": kloop_casts(compiled.asm.get("ttgir", "")),
    }
    if res["spill_stores"] is not None:
        res["spill_bytes"] = res["spill_stores"] + res["spill_loads"]
    else:
        res["spill_bytes"] = cu.get("LOCAL", 0)
    return res


_CAST_OPS = ("arith.truncf", "arith.extf", "tt.fp_to_fp")
_DOT_OPS = ("tt.dot ", "tt.dot_scaled", "ttng.warp_group_dot ")


def kloop_casts(ttgir: str) -> list[str]:
    """Float conversions inside the loops that contain a dot (the K loops) of a TTGIR
    dump: one ``"op: operand type"`` string per conversion (``[]``: none). A conversion
    there is a per-iteration cast of a tile (e.g. fp32 weights to bf16 before the MMA),
    which on Hopper goes shared -> registers -> convert -> shared and waits for the MMA."""
    lines = ttgir.splitlines()
    found, i = [], 0
    while i < len(lines):
        if "scf.for" in lines[i] and lines[i].rstrip().endswith("{"):
            depth, j = 1, i + 1
            while j < len(lines) and depth:
                depth += lines[j].count("{") - lines[j].count("}")
                j += 1
            body = lines[i + 1:j]
            if any(d in ln for ln in body for d in _DOT_OPS):
                for ln in body:
                    for op in _CAST_OPS:
                        if op in ln:
                            found.append(f"{op}: {ln.split(':', 1)[-1].strip()[:80]}")
            i = j
        else:
            i += 1
    return found


def check_resources(res: dict) -> list[str]:
    """Problems of one :func:`compile_for_sm90` result against the H100 limits ([] if fine)."""
    bad = []
    if res["spill_bytes"]:
        bad.append(f"{res['spill_bytes']} bytes of register spills")
    if res["shared_bytes"] > H100_MAX_SHARED_BYTES:
        bad.append(f"{res['shared_bytes']} bytes of shared memory > {H100_MAX_SHARED_BYTES}")
    if res["registers"] is not None and res["registers"] > H100_MAX_REGISTERS:
        bad.append(f"{res['registers']} registers > {H100_MAX_REGISTERS}")
    return bad


# ----------------------------------------------------------------------------------------
# Tables: compile a list of specs (in parallel) in a process without TRITON_INTERPRET
# ----------------------------------------------------------------------------------------
def _load_specs(factory: str):
    """``"package.module:function"`` -> the list of spec dicts that function returns. Each
    spec has keys ``kernel, variant, config, fn, signature, constexprs, num_warps,
    num_stages`` and optionally ``divisible_by_16`` (see ``conv3x3.aot_specs``)."""
    import importlib
    mod, _, func = factory.partition(":")
    return getattr(importlib.import_module(mod), func)()


def _compile_one(factory: str, i: int) -> dict:
    sp = _load_specs(factory)[i]
    res = compile_for_sm90(sp["fn"], sp["signature"], sp["constexprs"], sp["num_warps"],
                           sp["num_stages"], divisible_by_16=sp.get("divisible_by_16", ()))
    row = {"kernel": sp["kernel"], "variant": sp["variant"], "config": sp["config"]}
    row.update({k: res[k] for k in ("registers", "shared_bytes", "spill_bytes", "spill_stores",
                                    "spill_loads", "local_bytes", "uses_tma", "uses_wgmma",
                                    "kloop_casts")})
    row["problems"] = check_resources(res)
    return row


def compile_table(factory: str, workers: int | None = None) -> list[dict]:
    """Compile every spec of ``factory`` (``"module:function"``) for sm_90, ``workers``
    processes in parallel; one row per spec: kernel, variant, config, registers,
    shared_bytes, spill_bytes, ..., problems (``check_resources``). Must run where
    TRITON_INTERPRET is unset (kernels are interpreter objects otherwise): see
    :func:`compile_table_subprocess`."""
    n = len(_load_specs(factory))
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1:
        return [_compile_one(factory, i) for i in range(n)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_compile_one, [factory] * n, range(n)))


class Sm90Unavailable(RuntimeError):
    """This Triton / machine cannot compile for sm_90 (the message says why)."""


def compile_table_subprocess(factories: list[str], workers: int | None = None,
                             timeout: float = 1500, python: str | None = None,
                             info: dict | None = None) -> list[dict]:
    """:func:`compile_table` for each factory, run in a fresh Python without
    TRITON_INTERPRET (usable from the interpreter-mode test suite); ``python``: another
    interpreter (e.g. a venv with another Triton version) with fastbegan importable.
    ``info``: a dict that receives the child's ``triton_version``. Raises
    :class:`Sm90Unavailable` if that Triton cannot compile for sm_90 here, RuntimeError
    with the child's output if compiling fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "table.json")
        cmd = [python or sys.executable, "-m", "fastbegan.kernels.aot", "--out", out,
               "--workers", str(workers or 0), *factories]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"sm_90 compile failed ({' '.join(cmd)}):\n{r.stdout[-4000:]}\n"
                               f"{r.stderr[-4000:]}")
        with open(out) as f:
            data = json.load(f)
    if "unavailable" in data:
        raise Sm90Unavailable(data["unavailable"])
    if info is not None:
        info["triton_version"] = data["triton_version"]
    return data["rows"]


def write_table(path, rows: list[dict], what: str, triton_version: str | None = None) -> None:
    """Write a resource table (rows of :func:`compile_table`) as JSON, with the target,
    the Triton version (this process's unless given) and the limits it was checked
    against."""
    from pathlib import Path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"what": what, "target": "GPUTarget('cuda', 90, 32)",
           "triton_version": triton_version or triton.__version__,
           "limits": {"shared_bytes": H100_MAX_SHARED_BYTES, "registers": H100_MAX_REGISTERS,
                      "spill_bytes": 0},
           "rows": rows}
    path.write_text(json.dumps(doc, indent=1) + "\n")


def table_violations(rows: list[dict]) -> list[str]:
    """One line per row that spills, overflows shared memory or has no register count."""
    bad = [f"{r['kernel']} {r['variant']} {r['config']}: {'; '.join(r['problems'])}"
           for r in rows if r["problems"]]
    bad += [f"{r['kernel']} {r['variant']} {r['config']}: no register count"
            for r in rows if not r["registers"]]
    return bad


def _main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Compile kernel specs for sm_90 and print a "
                                "resource table (registers, shared memory, spills).")
    p.add_argument("factories", nargs="+", help="module:function returning specs, e.g. "
                   "fastbegan.kernels.conv3x3:aot_specs")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args(argv)
    reason = sm90_unavailable_reason()
    if reason is not None:
        print(f"cannot compile for sm_90: {reason}")
        if a.out:
            with open(a.out, "w") as fh:
                json.dump({"unavailable": reason}, fh)
        return 0
    rows = []
    for f in a.factories:
        rows += compile_table(f, a.workers or None)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"triton_version": triton.__version__, "rows": rows}, fh, indent=1)
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"{r['kernel']:28s} {r['variant']:24s} {cfg:50s} regs={r['registers']} "
              f"smem={r['shared_bytes']} spills={r['spill_bytes']} {'; '.join(r['problems'])}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
