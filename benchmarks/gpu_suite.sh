#!/usr/bin/env bash
# The whole GPU check as ONE command (benchmarks/README.md):
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# On a fresh GPU machine with torch and triton already installed (no internet):
#   1. installs the project without touching torch (pip --no-deps --no-build-isolation -e .)
#   2. fastbegan doctor: every kernel path vs the torch reference at the real layer shapes
#      (res 64 and 128, bf16 and fp32); its compiles and autotuning are this stage's time,
#      and its autotune results (cached on disk) serve the later stages
#   3. runs the test suite on the GPU            (pytest tests -x -q, TRITON_INTERPRET unset)
#   4. a short training run at res 128           (fastbegan train --res 128 --steps N
#      --verify-kernels); the summary splits its warm-up (compile, autotune, capture: the
#      first log interval) from the steps/s after warm-up
#   5. the benchmarks                             (pytest benchmarks/, budgeted to the time left)
#   5b. the distributed path at world size 1      (benchmarks/distributed_step.py: the fused
#      step plain and under torchrun in a one-process group; in the time left after 5)
# and leaves few files in OUTDIR (the device tool brings back at most 8):
#   summary.txt               stage, exit code, seconds (also printed); kernel paths dropped
#                             for good, and a stage rerun after a sticky CUDA error
#   doctor.json               the doctor's table (written as it goes: complete=false if cut)
#   <device>-<date>.json/.md  benchmark results (copied from the run's results folder)
#   samples.png               the training run's newest sample grid
#   logs.tar.gz               every stage's log, the run's metrics.jsonl, pytest-benchmark json
#
# Each stage runs under `timeout` (SIGINT first, so pytest still writes its results), and
# the whole script stays under TOTAL_S (default 470 s): a stage gets min(its limit, time
# left). Tunables (environment): TOTAL_S, T_INSTALL, T_DOCTOR, T_TESTS, T_TRAIN, T_BENCH, T_DIST,
# TRAIN_STEPS, TRAIN_ARGS, PYTHON, FASTBEGAN_BENCH_COMPILE_BUDGET_S, SKIP_DOCTOR=1,
# SKIP_TESTS=1, SKIP_TRAIN=1, SKIP_DIST=1, SKIP_BENCH=1.
#
# Autotuning from a cold start: FASTBEGAN_AUTOTUNE_MAX (default 2 here) keeps, per tuning
# key, the first 2 configs that fit the shape; every config list is written best-first for
# the H100 (largest tiles that fit first), so this keeps the largest fitting tiles and
# halves (or better) the timings a cold start makes. FASTBEGAN_AUTOTUNE_MAX=0 tunes all.
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-470}
T_INSTALL=${T_INSTALL:-45}
T_DOCTOR=${T_DOCTOR:-140}
T_TESTS=${T_TESTS:-80}
T_TRAIN=${T_TRAIN:-90}
T_DIST=${T_DIST:-75}
T_BENCH=${T_BENCH:-170}
TRAIN_STEPS=${TRAIN_STEPS:-400}
T0=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastbegan-gpu-suite.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
export FASTBEGAN_AUTOTUNE_MAX=${FASTBEGAN_AUTOTUNE_MAX:-2}
export FASTBEGAN_CACHE=$WORK/cache          # procedural data cache, outside the repo
export FASTBEGAN_BENCH_RESULTS=$WORK/results  # this run's results only

say() { echo "$*" | tee -a "$SUMMARY"; }

left() { echo $(( TOTAL_S - ($(date +%s) - T0) )); }

# Kernel paths dropped for good (a sticky CUDA error, a wrong result) are recorded here by
# any stage and skipped by every later one (docs/kernels.md, "fallback chain").
DROPPED=$FASTBEGAN_CACHE/dropped_paths.json

# stage NAME LIMIT_S CMD...: run with a time limit, log to $LOGS/NAME.log, record rc + seconds.
# A stage that fails after recording a dropped kernel path (it died of a sticky CUDA error,
# which no process survives) runs once more: the next process takes the next path.
stage() {
    local name=$1 limit=$2; shift 2
    local l; l=$(left)
    (( l - 15 < limit )) && limit=$(( l - 15 ))
    if (( limit < 5 )); then
        say "$(printf '%-8s skipped: no time left (%ss of %ss used)' "$name" "$(( $(date +%s) - T0 ))" "$TOTAL_S")"
        return 0
    fi
    local before; before=$(cksum "$DROPPED" 2>/dev/null)
    local s rc; s=$(date +%s.%N)
    timeout -s INT -k 20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    local dt; dt=$(awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    local note=""
    (( rc == 124 || rc == 137 )) && note=" TIMEOUT"
    say "$(printf '%-8s rc=%-3s %6ss (limit %ss)%s' "$name" "$rc" "$dt" "$limit" "$note")"
    # the log's outcome lines (pytest summary, errors), else its last lines
    { grep -E '(passed|failed|[0-9] errors?|no tests ran|Traceback|Error:|error:|done: step|results:)' \
        "$LOGS/$name.log" || tail -n 3 "$LOGS/$name.log"; } | tail -n 3 | cut -c1-300 \
        | sed 's/^/         | /' | tee -a "$SUMMARY"
    if (( rc != 0 )) && [[ "$(cksum "$DROPPED" 2>/dev/null)" != "$before" && "$name" != *-rerun ]]; then
        say "$(printf '%-8s recorded a dropped kernel path (%s): running it once more' "$name" "$DROPPED")"
        stage "$name-rerun" "$limit" "$@"
    fi
    return 0
}

say "fastbegan GPU suite: $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $REPO, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# --- 0. environment (what the machine has)
stage env 20 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name()); print(\"triton\", triton.__version__)'; $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|numpy|pillow|click|safetensors|tqdm|hypothesis|setuptools) '"

# --- 1. install without touching torch / triton
stage install "$T_INSTALL" "$PY" -m pip install --no-deps --no-build-isolation --no-input -e .
if ! "$PY" -c "import fastbegan.kernels" > /dev/null 2>&1; then
    # pip could not build (e.g. an old setuptools without bdist_wheel): the editable
    # install by hand, a .pth hook that puts the repo on sys.path and maps kernels/ to
    # fastbegan.kernels (what setuptools' editable finder does). Nothing else changes.
    stage install2 20 "$PY" - "$REPO" <<'PYEOF'
import sys, sysconfig
from pathlib import Path
repo = sys.argv[1]
site = Path(sysconfig.get_paths()["purelib"])
(site / "_fastbegan_dev.py").write_text(f"""import importlib.abc, importlib.util, sys
REPO = {repo!r}
if REPO not in sys.path:
    sys.path.insert(0, REPO)
class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastbegan.kernels":
            return importlib.util.spec_from_file_location(
                name, REPO + "/kernels/__init__.py", submodule_search_locations=[REPO + "/kernels"])
        return None
sys.meta_path.insert(0, _Finder())
""")
(site / "_fastbegan_dev.pth").write_text("import _fastbegan_dev\n")
import importlib; importlib.invalidate_caches()
print("wrote", site / "_fastbegan_dev.pth")
PYEOF
    "$PY" -c "import fastbegan.kernels, fastbegan.cli; print('fastbegan importable')" >> "$LOGS/install2.log" 2>&1 \
        && say "install: fallback .pth hook works" || say "install: fastbegan NOT importable (see install*.log)"
fi

# procedural faces for the training run, drawn in the background while the tests run
timeout 150 "$PY" -c "from fastbegan.data import load_procedural; print(load_procedural(128)[1].summary())" \
    > "$LOGS/data.log" 2>&1 &
DATA_PID=$!

# --- 2. doctor: every kernel path against the reference (first: it also warms the caches)
if [[ "${SKIP_DOCTOR:-0}" != 1 ]]; then
    stage doctor "$T_DOCTOR" "$PY" -m fastbegan doctor --out "$OUT/doctor.json"
    "$PY" - "$OUT/doctor.json" <<'PYEOF' | tee -a "$SUMMARY"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"doctor: no table ({e})"); sys.exit(0)
rows = r["rows"]; bad = [x for x in rows if x["status"] not in ("pass", "skip")]
print(f"doctor: {len(rows) - len(bad)}/{len(rows)} rows pass in {r['seconds']} s"
      f"{'' if r.get('complete') else ' (cut short)'}")
for x in bad[:12]:
    print(f"         | {x['status']} {x['op']} {x['shape']} {x['path']} {x['dtype']} {x['note']}")
PYEOF
fi

# --- 3. tests on the GPU
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    stage tests "$T_TESTS" "$PY" -m pytest tests -x -q -p no:cacheprovider --durations=15
fi

# --- 4. short training run at res 128 (defaults otherwise: the user's `fastbegan train --res 128`)
if [[ "${SKIP_TRAIN:-0}" != 1 ]]; then
    wait "$DATA_PID" 2>/dev/null
    RUN=$WORK/run128
    # shellcheck disable=SC2086
    # --resume: a rerun after a sticky CUDA error continues from the run's last checkpoint
    stage train "$T_TRAIN" "$PY" -m fastbegan train --res 128 --steps "$TRAIN_STEPS" --out "$RUN" \
        --sample-every 100 --ckpt-every 200 --log-every 25 --no-progress --verify-kernels --resume \
        ${TRAIN_ARGS:-}
    # warm-up (the first log interval: compile, autotune, graph capture) vs steps/s after it
    "$PY" - "$RUN/metrics.jsonl" <<'PYEOF' | tee -a "$SUMMARY"
import json, statistics, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1])]
except Exception as e:
    print(f"train: no metrics ({e})"); sys.exit(0)
if rows:
    first = rows[0]
    print(f"train: first {first['step']} steps (warm-up: compile, autotune, capture) took "
          f"{first['step'] / max(first['steps_per_s'], 1e-9):.1f} s")
if len(rows) > 1:
    sps = [r["steps_per_s"] for r in rows[1:]]
    print(f"train: after warm-up {statistics.median(sps):.1f} steps/s "
          f"({1000 / statistics.median(sps):.2f} ms/step; median of {len(sps)} log intervals)")
PYEOF
    PNG=$(ls -t "$RUN"/samples/fake_*.png 2>/dev/null | head -n 1)
    if [[ -z "$PNG" ]]; then  # cut short before the first grid: sample from the newest checkpoint
        CK=$(ls -t "$RUN"/checkpoints/*.safetensors 2>/dev/null | head -n 1)
        if [[ -n "$CK" ]]; then
            stage sample 30 "$PY" -m fastbegan sample "$CK" --out "$RUN/samples/from_checkpoint.png" --device cuda
            PNG=$RUN/samples/from_checkpoint.png
        fi
    fi
    if [[ -n "$PNG" && -f "$PNG" ]]; then
        cp "$PNG" "$OUT/samples.png" && say "samples: $(basename "$PNG") -> samples.png"
    else
        say "samples: none (see train.log)"
    fi
    cp "$RUN/metrics.jsonl" "$LOGS/train_metrics.jsonl" 2>/dev/null
fi
kill "$DATA_PID" 2>/dev/null

# --- 5. benchmarks, budgeted to the time left
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
    L=$(left); LIM=$T_BENCH
    [[ "${SKIP_DIST:-0}" != 1 ]] && L=$(( L - T_DIST ))   # keep the distributed stage's time
    (( L - 25 < LIM )) && LIM=$(( L - 25 ))
    # no new case after BUDGET s; the last case and the report fit in the rest
    BUDGET=$(( LIM - 40 )); (( BUDGET < 10 )) && BUDGET=10
    export FASTBEGAN_BENCH_BUDGET_S=$BUDGET
    export FASTBEGAN_BENCH_COMPILE_BUDGET_S=${FASTBEGAN_BENCH_COMPILE_BUDGET_S:-$(( BUDGET / 3 ))}
    say "benchmarks: case budget ${BUDGET}s, compile budget ${FASTBEGAN_BENCH_COMPILE_BUDGET_S}s"
    BJSON=()  # pytest-benchmark's own json, when the plugin is installed (the suite works without)
    "$PY" -c "import pytest_benchmark" 2>/dev/null && BJSON=(--benchmark-json="$LOGS/pytest-benchmark.json")
    stage bench "$LIM" "$PY" -m pytest benchmarks -q -p no:cacheprovider "${BJSON[@]}"
    for f in "$FASTBEGAN_BENCH_RESULTS"/*.json "$FASTBEGAN_BENCH_RESULTS"/*.md; do
        [[ -f "$f" ]] && cp "$f" "$OUT/" && say "results: $(basename "$f")"
    done
fi

# --- 5b. the distributed path at world size 1 (T_DIST is kept for it; res 64: compiles fast): the fused
#     step plain vs under torchrun in a one-process NCCL group (its all-reduce inside the
#     step's CUDA graph), interleaved
if [[ "${SKIP_DIST:-0}" != 1 ]]; then
    stage dist "$T_DIST" "$PY" benchmarks/distributed_step.py --device cuda --res 64 --repeats 1 --timeout 60
    grep -h "process group of one" "$FASTBEGAN_BENCH_RESULTS"/*-distributed-*.md 2>/dev/null \
        | sed 's/^- /dist: /' | cut -c1-300 | tee -a "$SUMMARY"
    for f in "$FASTBEGAN_BENCH_RESULTS"/*-distributed-*.json "$FASTBEGAN_BENCH_RESULTS"/*-distributed-*.md; do
        [[ -f "$f" ]] && cp "$f" "$OUT/" && say "results: $(basename "$f")"
    done
fi

# --- 6. logs: one archive (no checkpoints, no data cache)
if [[ -f "$DROPPED" ]]; then
    say "kernel paths dropped for good on this GPU (skipped after their first failure):"
    "$PY" -c "import json,sys; t=json.load(open(sys.argv[1]))
for env, v in t.items():
    for var, paths in v.items():
        for p, why in paths.items(): print(f'         | {p:8s} {var}: {why}'[:300])" "$DROPPED" | tee -a "$SUMMARY"
    cp "$DROPPED" "$LOGS/"
fi
say "total $(( $(date +%s) - T0 ))s"
cp "$SUMMARY" "$LOGS/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
ls -la "$OUT"
