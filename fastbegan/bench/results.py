"""Results files: speedups and % of peak, the Markdown table, writing, validating, finding the newest."""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from .schema import ROW_KEYS, SCHEMA, SPEEDUP_KEYS, VARIANTS, WORKLOADS

def merge_repeats(rows: list[dict]) -> list[dict]:
    """One row per (workload, case, variant): a case measured in several processes (the
    CPU real shapes, interleaved repeats) becomes the median of their medians, with the
    smallest and largest of them as q1 / q3, the largest peak memory, and a note saying so.
    Failed repeats are left out while one succeeded."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["case"], r["variant"]), []).append(r)
    out = []
    for group in groups.values():
        ok = [r for r in group if r.get("status") == "ok"]
        if len(ok) <= 1:
            out.append(ok[0] if ok else group[-1])
            continue
        meds = sorted(r["ms_median"] for r in ok)
        med = statistics.median(meds)
        row = dict(min(ok, key=lambda r: abs(r["ms_median"] - med)))
        row.update(ms_median=med, ms_q1=meds[0], ms_q3=meds[-1], ms_iqr=meds[-1] - meds[0],
                   ms_min=min(r["ms_min"] for r in ok), rounds=sum(r.get("rounds") or 0 for r in ok))
        set_rates(row)
        mems = [r["peak_mem_mb"] for r in ok if r.get("peak_mem_mb") is not None]
        row["peak_mem_mb"] = max(mems) if mems else None
        row["what"] = (row.get("what") or "") + (
            f" [median of {len(ok)} processes run interleaved with the other variants; "
            f"q1/q3: the fastest and slowest of them]")
        out.append(row)
    return out


def set_rates(row: dict) -> None:
    """images/s, TFLOP/s and GB/s of a row from its work per call and its median time."""
    sec = row["ms_median"] / 1e3
    if row.get("images"):
        row["images_per_s"] = row["images"] / sec
    if row.get("flops"):
        row["tflops"] = row["flops"] / sec / 1e12
    if row.get("bytes"):
        row["gbps"] = row["bytes"] / sec / 1e9


def finalize_rows(rows: list[dict], meta: dict) -> list[dict]:
    """Rows (repeats merged) plus speedups over (p), over (a) and over the best of (b)/(c),
    and % of peak."""
    rows = merge_repeats(rows)
    spec = (meta.get("device") or {}).get("peak_bf16_tflops_spec")
    measured = measured_peak(rows)
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("variant") in VARIANTS:
            by_case.setdefault((r["workload"], r["case"]), {})[r["variant"]] = r
    out = []
    for r in rows:
        r = dict(r)
        r.update(dict.fromkeys(SPEEDUP_KEYS))
        r["pct_peak_spec"] = r["pct_peak_measured"] = None
        if r.get("status") == "ok":
            group = by_case.get((r["workload"], r["case"]), {})
            t = r["ms_median"]
            for base in "pa":
                if base in group:
                    r[f"speedup_vs_{base}"] = group[base]["ms_median"] / t
            bc = [group[v]["ms_median"] for v in "bc" if v in group]
            if bc and r["variant"] in VARIANTS:
                r["speedup_vs_best_bc"] = min(bc) / t
            if r.get("tflops"):
                if spec:
                    r["pct_peak_spec"] = 100 * r["tflops"] / spec
                if measured:
                    r["pct_peak_measured"] = 100 * r["tflops"] / measured
        out.append(r)
    return out


def measured_peak(rows: list[dict]) -> float | None:
    vals = [r["tflops"] for r in rows if r.get("workload") == "matmul_peak" and r.get("status") == "ok"
            and r.get("tflops")]
    return max(vals) if vals else None


def _fmt(v, nd=2, suffix=""):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and abs(v) < 10 ** -nd:
            return f"{v:.2g}{suffix}"
        return f"{v:,.{nd}f}{suffix}"
    return f"{v}{suffix}"


def render_markdown(rows: list[dict], meta: dict) -> str:
    rows = finalize_rows(rows, meta)
    dev, env = meta.get("device", {}), meta.get("env", {})
    spec = dev.get("peak_bf16_tflops_spec")
    measured = measured_peak(rows)
    commit = env.get("commit") or "unknown"
    if env.get("dirty"):
        commit += " (+ uncommitted changes)"
    lines = [f"# fastbegan benchmarks: {dev.get('name', '?')}", "",
             f"- date: {meta.get('created', '?')}",
             f"- device: {dev.get('name', '?')} ({dev.get('type', '?')}"
             + (f", sm_{dev['capability'].replace('.', '')}, {dev.get('sms')} SMs, {dev.get('memory_gb')} GB"
                if dev.get("type") == "cuda" else f", {dev.get('threads')} threads") + ")",
             f"- torch {env.get('torch')}, triton {env.get('triton')}, python {env.get('python')}"
             + (f", CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}" if env.get("cuda") else ""),
             f"- git commit: {commit}",
             f"- bf16 dense peak: spec {_fmt(spec, 1)} TFLOP/s"
             + (f" ({dev.get('peak_spec_entry')})" if dev.get("peak_spec_entry") else "")
             + f"; measured (bf16 matmul in this run) {_fmt(measured, 1)} TFLOP/s",
             f"- run: {'complete' if meta.get('complete') else 'partial (written while running)'}, "
             f"{_fmt(meta.get('elapsed_s'), 0)} s, compile time {_fmt(meta.get('compile_used_s'), 0)} s",
             f"- FLOPs: {meta.get('flops_note', '')}",
             "- timing: median of rounds (each round: `inner` iterations, then one synchronisation); "
             "IQR = q3 - q1; speedups compare medians within the same case",
             *(f"- {note}" for note in meta.get("notes") or []),
             "", "Variants: " + "; ".join(f"**{k}** {v}" for k, v in VARIANTS.items()), ""]
    order = list(WORKLOADS)
    workloads = sorted({r["workload"] for r in rows}, key=lambda w: order.index(w) if w in order else 99)
    for wl in workloads:
        wrows = [r for r in rows if r["workload"] == wl]
        first = {}
        for r in wrows:
            first.setdefault(r["case"], len(first))
        wrows.sort(key=lambda r: (first[r["case"]], r["variant"]))
        lines += [f"## {wl}: {WORKLOADS.get(wl, '')}", ""]
        cols = ["case", "var", "ms (median)", "IQR ms", "images/s", "vs p", "vs a", "vs best(b,c)", "TFLOP/s",
                "% spec peak", "% meas. peak", "peak mem MB"]
        if wl == "l1_loss":
            cols[8:11] = ["GB/s"]
        cols.append("status / what")
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in wrows:
            ok = r["status"] == "ok"
            cells = [r["case"], r["variant"], _fmt(r.get("ms_median"), 3), _fmt(r.get("ms_iqr"), 3),
                     _fmt(r.get("images_per_s"), 0) if r.get("images_per_s") else "n/a",
                     *(_fmt(r.get(k), 2, "x") for k in SPEEDUP_KEYS)]
            if wl == "l1_loss":
                cells.append(_fmt(r.get("gbps"), 1))
            else:
                cells += [_fmt(r.get("tflops"), 3), _fmt(r.get("pct_peak_spec"), 1),
                          _fmt(r.get("pct_peak_measured"), 1)]
            cells.append(_fmt(r.get("peak_mem_mb"), 0))
            note = r.get("what") or ""
            if not ok:
                note = f"**{r['status']}**: {r.get('reason') or ''}"
            cells.append(note.replace("|", "/").replace("\n", " "))
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.json`` and ``stem.md`` atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "meta": meta, "rows": finalize_rows(rows, meta)}
    paths = []
    for suffix, text in ((".json", json.dumps(doc, indent=1, default=str)), (".md", render_markdown(rows, meta))):
        path = out_dir / f"{stem}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def prune_cpu_results(results_dir: Path | None, keep: int = 4) -> None:
    """Delete all but the newest ``keep`` cpu-smoke-* results (git-ignored tiny-shape output)."""
    if results_dir is None or not Path(results_dir).is_dir():
        return
    stems = sorted({p.stem for p in Path(results_dir).glob("cpu-smoke-*.json")})
    for stem in stems[:-keep] if keep else stems:
        for suffix in (".json", ".md"):
            (Path(results_dir) / f"{stem}{suffix}").unlink(missing_ok=True)


def validate_results(doc: dict) -> list[str]:
    """Problems with a results document (empty list = well formed)."""
    errs = []
    if doc.get("schema") != SCHEMA:
        errs.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    meta = doc.get("meta") or {}
    for key in ("device", "env", "created"):
        if key not in meta:
            errs.append(f"meta.{key} missing")
    for key in ("name", "type", "slug"):
        if key not in meta.get("device", {}):
            errs.append(f"meta.device.{key} missing")
    for key in ("torch", "triton", "commit"):
        if key not in meta.get("env", {}):
            errs.append(f"meta.env.{key} missing")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        errs.append("rows missing or empty")
        return errs
    for i, r in enumerate(rows):
        missing = [k for k in ROW_KEYS + SPEEDUP_KEYS + ("pct_peak_spec", "pct_peak_measured") if k not in r]
        if missing:
            errs.append(f"row {i}: keys missing: {missing}")
            continue
        if r["status"] not in ("ok", "n/a", "skipped", "error"):
            errs.append(f"row {i}: bad status {r['status']!r}")
        if r["status"] == "ok":
            for k in ("ms_median", "ms_q1", "ms_q3", "ms_min"):
                if not (isinstance(r[k], (int, float)) and r[k] > 0 and math.isfinite(r[k])):
                    errs.append(f"row {i} ({r['workload']}/{r['variant']}): {k} = {r[k]!r}")
            if isinstance(r["ms_q1"], (int, float)) and isinstance(r["ms_q3"], (int, float)) \
                    and not r["ms_q1"] <= r["ms_median"] <= r["ms_q3"]:
                errs.append(f"row {i}: median outside [q1, q3]")
        elif not r.get("reason"):
            errs.append(f"row {i}: status {r['status']} without a reason")
    return errs


def newest_results(results_dir: Path) -> Path | None:
    files = [p for p in Path(results_dir).glob("*.json") if not p.name.startswith(".")]
    if not files:
        return None
    return max(files, key=lambda p: (json.loads(p.read_text()).get("meta", {}).get("created", ""),
                                     p.stat().st_mtime) if is_results(p) else ("", 0))


def is_results(p: Path) -> bool:
    try:
        return json.loads(p.read_text()).get("schema") == SCHEMA
    except (OSError, ValueError):
        return False
