#!/usr/bin/env bash
# shellcheck disable=SC2329  # the step_* functions run through `timeout bash -c`
# One GPU session in one script (GPU time comes in 15-minute slots on one H200): build the
# extension for sm_90, run the GPU tests, an end-to-end prune on cuda, the three kernel
# benchmarks, `slimops bench` of a 7B-shaped bf16 model against a pruned copy, and SlimGPT's
# fast path vs the paper-faithful reference at the LLaMA-7B layer shape.
#
#   scripts/gpu_check.sh                         # on the GPU machine: writes to $OUT
#   scripts/gpu_check.sh --out DIR               # anywhere else
#   scripts/gpu_check.sh --dry-run --out DIR     # CPU: every step on tiny shapes, no build
#                                                # (tests/test_gpu_check.py runs this)
# Steps, in order: env build tests e2e torchrun hessian obs slice_gemm shaped_7b prune_7b throughput
# bench_prune (prune_7b falls back to magnitude when slimgpt fails, for the throughput).
# Options: --steps a,b,c (run only these), --budget SECONDS (no step starts
# once it is spent, so the summary always prints; default 480, dry run 900), --keep-models.
# Environment: PYTHON (default python3), SCRATCH (the 7B models, ~25 GB; default a temp
# folder, removed at the end).
#
# Every step has its own timeout and log; a failed step is recorded and the next one runs
# (steps that need its output are skipped). The out folder holds at most 8 files (the device
# tool returns no more): summary.json, logs.tar.gz (every step's log, the pytest junit XML,
# the 7B prune report) and the step JSONs hessian.json obs.json slice_gemm.json e2e.json
# throughput.json bench_prune.json. The last lines printed are the summary table.
# Exit status: 0 when every step that ran passed and none was skipped, else 1.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ALL_STEPS=(env build tests e2e torchrun hessian obs slice_gemm shaped_7b prune_7b throughput bench_prune)
# Seconds each step may run on the GPU machine (the budget may cut a step's limit shorter).
declare -A LIMIT=(
    [env]=30 [build]=300 [tests]=180 [e2e]=120 [torchrun]=120 [hessian]=90 [obs]=90 [slice_gemm]=90
    [shaped_7b]=120 [prune_7b]=180 [prune_7b_magnitude]=90 [throughput]=150 [bench_prune]=150
)
MIN_STEP=15 # a step is not started with fewer seconds than this left in the budget

DRY=0 OUT_DIR=${OUT:-} STEPS="" BUDGET="" KEEP_MODELS=0
usage() { sed -n '3,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --steps) STEPS=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        --keep-models) KEEP_MODELS=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$OUT_DIR" ] || { echo "gpu_check: give --out DIR (or set OUT)" >&2; exit 2; }
[ -n "$BUDGET" ] || BUDGET=$((DRY ? 900 : 480))
[ -n "$STEPS" ] || STEPS=$(IFS=,; echo "${ALL_STEPS[*]}")
for s in ${STEPS//,/ }; do
    [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || {
        echo "gpu_check: unknown step $s (choose from: ${ALL_STEPS[*]})" >&2
        exit 2
    }
done

mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOGS="$OUT_DIR/logs"
mkdir -p "$LOGS"
if [ -z "${SCRATCH:-}" ]; then
    SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    OWN_SCRATCH=1
else
    mkdir -p "$SCRATCH"
    OWN_SCRATCH=0
fi
# Every temporary file of the steps (torchrun's torchelastic_* rendezvous folders, inductor's
# cache) goes under the scratch folder, so nothing outlives the run.
mkdir -p "$SCRATCH/tmp" && export TMPDIR="$SCRATCH/tmp"
export ROOT DRY OUT_DIR LOGS SCRATCH
export PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE=cuda
[ "$DRY" = 1 ] && DEVICE=cpu
export DEVICE
cd "$ROOT" || exit 2
START=$(date +%s)

# ---- the steps: each runs in its own bash under `timeout`, output to $LOGS/<step>.log ------

export GPU_TESTS="tests/test_hessian.py tests/test_obs.py tests/test_slice_gemm.py \
tests/test_ops.py tests/test_dispatch.py tests/test_virtual.py"

step_env() {
    date -u
    uname -a
    nvidia-smi || echo "(no nvidia-smi)"
    command -v nvcc && nvcc --version
    "$PY" - <<'EOF' || true
import sys

import torch

print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
for name in ("transformers", "triton", "accelerate", "safetensors", "tokenizers", "pytest"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "missing:", exc)
EOF
    nproc
    free -g || true
    df -h "$ROOT" "$SCRATCH" || true
}

step_build() {
    if [ "$DRY" = 1 ]; then
        echo "dry run: no sm_90 build; the existing install is used"
    else
        if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
            CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
            export CUDA_HOME
        fi
        echo "CUDA_HOME=${CUDA_HOME:-unset}"
        if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" -m pip install --no-index --no-deps \
            --no-build-isolation -v -e .; then
            # Still install the package (Triton and the references run without the
            # extension), so the later steps measure what they can; this step stays failed.
            echo "gpu_check: the sm_90 build FAILED; installing without the extension"
            SLIMOPS_NO_EXT=1 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
            return 1
        fi
        for so in slimops/_C*.so; do
            command -v cuobjdump >/dev/null && cuobjdump --list-elf "$so" | head -20
        done
    fi
    "$PY" - <<'EOF'
import os

import torch

import slimops.ops as ops

backends = ops.backends()
print(backends)
if os.environ["DEVICE"] == "cuda":
    assert backends["cuda"].startswith("C++/CUDA"), f"no CUDA kernels: {backends['cuda']}"
    for op in ops.SCHEMAS:
        print(op, "cuda kernel:", ops.has_kernel(op, "cuda"))
print("torch", torch.__version__)
EOF
}

step_tests() {
    if [ "$DRY" = 1 ]; then # the same files, collected only (a wrong name fails here)
        # shellcheck disable=SC2086
        "$PY" -m pytest -q -p no:cacheprovider --collect-only $GPU_TESTS
        return
    fi
    # shellcheck disable=SC2086
    "$PY" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$LOGS/tests.xml" $GPU_TESTS
}

step_e2e() {
    if [ "$DRY" = 1 ]; then
        "$PY" "$SCRATCH/e2e.py" cpu 4 32 "$OUT_DIR/e2e.json"
    else
        "$PY" "$SCRATCH/e2e.py" cuda 32 128 "$OUT_DIR/e2e.json"
    fi
}

step_torchrun() { # 1-rank torchrun prune and sheared train on the GPU's process group: NCCL
    # takes no CPU tensor even at world size 1, so a collective on the wrong device fails here
    local model=slimops/assets/reference_model run=("$PY" -m torch.distributed.run --standalone
        --nproc_per_node 1 -m slimops.cli)
    "${run[@]}" prune "$model" --method slimgpt --ratio 0.2 --calib "$SCRATCH/calib.txt" \
        --nsamples 4 --seqlen 32 --device "$DEVICE" --out "$SCRATCH/torchrun_pruned" \
        --overwrite || return 1
    mkdir -p "$SCRATCH/domains/docs" "$SCRATCH/domains/code"
    cp README.md ARCHITECTURE.md "$SCRATCH/domains/docs/"
    cat slimops/*.py >"$SCRATCH/domains/code/slimops.txt"
    "${run[@]}" train "$model" --domains "$SCRATCH/domains" --out "$SCRATCH/torchrun_train" \
        --overwrite --ratio 0.5 --prune-steps 2 --steps 2 --batch-size 2 --seqlen 32 \
        --valid-windows 2 --eval-interval 2 --device "$DEVICE" || return 1
    "$PY" -c "import slimops; slimops.load('$SCRATCH/torchrun_train'); print('torchrun: ok')"
}

step_hessian() {
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_hessian.py --T 256 --d 64 96 --repeats 1 --json "$OUT_DIR/hessian.json"
    else
        "$PY" benchmarks/bench_hessian.py --json "$OUT_DIR/hessian.json"
    fi
}

step_obs() {
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_obs.py --d 128 --r 64 --s 16 --scoring 4 16 --repeats 1 \
            --json "$OUT_DIR/obs.json"
    else
        "$PY" benchmarks/bench_obs.py --json "$OUT_DIR/obs.json"
    fi
}

step_slice_gemm() {
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_slice_gemm.py --shape 64 256 --prefill 16 --decode 1 --repeats 1 \
            --json "$OUT_DIR/slice_gemm.json"
    else
        "$PY" benchmarks/bench_slice_gemm.py --json "$OUT_DIR/slice_gemm.json"
    fi
}

step_shaped_7b() {
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/make_shaped_model.py --hidden 64 --ffn 160 --heads 4 --kv-heads 2 \
            --layers 2 --dtype bf16 --out "$SCRATCH/dense" --overwrite
    else
        "$PY" benchmarks/make_shaped_model.py --preset llama-7b --device cuda \
            --out "$SCRATCH/dense" --overwrite
    fi
}

prune_7b_with() { # METHOD: the dense 7B-shaped model pruned by 20% on $DEVICE, in bf16
    local samples=4 seqlen=128
    [ "$DRY" = 1 ] && seqlen=32
    "$PY" -m slimops.cli prune "$SCRATCH/dense" --method "$1" --ratio 0.2 \
        --calib "$SCRATCH/calib.txt" --nsamples "$samples" --seqlen "$seqlen" \
        --device "$DEVICE" --dtype bf16 --out "$SCRATCH/pruned" --overwrite \
        --json "$LOGS/prune_7b_$1.json"
}
step_prune_7b() { prune_7b_with slimgpt; }
step_prune_7b_magnitude() { prune_7b_with magnitude; }

step_throughput() {
    if [ "$DRY" = 1 ]; then
        "$PY" -m slimops.cli bench "$SCRATCH/dense" "$SCRATCH/pruned" --device cpu --dtype bf16 \
            --batch 1 --prompt 8 --gen 2 --repeats 1 --warmup 0 --json "$OUT_DIR/throughput.json"
    else
        "$PY" -m slimops.cli bench "$SCRATCH/dense" "$SCRATCH/pruned" --device cuda --dtype bf16 \
            --batch 1 16 --prompt 128 --gen 64 --repeats 3 --json "$OUT_DIR/throughput.json"
    fi
}

step_bench_prune() { # SlimGPT fast vs reference on 2 layers of the LLaMA-7B shape
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_prune.py --layers 2 --hidden 64 --ffn 160 --heads 4 --vocab 256 \
            --nsamples 2 --seqlen 16 --batch-size 2 --device cpu --dtype bfloat16 \
            --json "$OUT_DIR/bench_prune.json"
    else
        "$PY" benchmarks/bench_prune.py --layers 2 --hidden 4096 --ffn 11008 --heads 32 \
            --kv-heads 32 --vocab 32000 --nsamples 32 --seqlen 512 --batch-size 8 \
            --device cuda --dtype bfloat16 --json "$OUT_DIR/bench_prune.json"
    fi
}

# ---- the end-to-end check (the tests have no cuda end-to-end cases): the shipped reference
# model pruned on $DEVICE by each method, perplexity, save, stock reload, same logits -------

write_e2e() {
    cat >"$SCRATCH/e2e.py" <<'EOF'
"""gpu_check e2e: DEVICE NSAMPLES SEQLEN OUT_JSON (calib/held-out text from $SCRATCH)."""

import json
import math
import os
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from slimops.calibration import calibration_tokens, load_text, tokenize
from slimops.checkpoint import save_pruned
from slimops.evaluation.perplexity import perplexity
from slimops.pipeline import load_model, prune_model

device, nsamples, seqlen, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
scratch = os.environ["SCRATCH"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-4, "bf16": 5e-2}  # reload vs in-memory logits, max abs
REF = "slimops/assets/reference_model"
dense, tok = load_model(REF)
tokens = calibration_tokens(f"{scratch}/calib.txt", tok, nsamples, seqlen)
held = tokenize(load_text(f"{scratch}/heldout.txt"), tok)
probe = held[: 2 * seqlen].view(2, seqlen).to(device)


@torch.no_grad()
def logits(model):
    return model(probe).logits.float()


def ppl(model):
    return perplexity(model, held, seqlen, 8, device=device, max_windows=32, progress=False)


cases = [("slimgpt", "fp32", device), ("slimgpt", "bf16", device)]
if device != "cpu":  # the dry run (CPU) checks the plumbing on the first two only
    cases += [("slimgpt", "fp32", "cpu")]
    cases += [(m, "fp32", device) for m in ("wanda-sp", "flap", "taylor", "magnitude")]
rows, plans = [], {}
for method, dtype, dev in cases:
    row = {"method": method, "dtype": dtype, "device": dev}
    try:
        model, _ = load_model(REF, dtype)  # as the CLI loads it (a .to(bf16) also casts RoPE)
        options = {"align": 64} if method == "slimgpt" else {}
        start = time.perf_counter()
        plan, report = prune_model(model, tokens, method, 0.2, device=dev, **options)
        row["prune_seconds"] = time.perf_counter() - start
        row["achieved_ratio"] = report.achieved_ratio
        plans[(method, dtype, dev)] = plan.shapes()
        model.to(device)
        row["ppl"] = ppl(model)
        want = logits(model)
        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            save_pruned(model.to("cpu"), f"{folder}/m", tokenizer=tok, plan=plan)
            again = AutoModelForCausalLM.from_pretrained(
                f"{folder}/m", trust_remote_code=True, dtype=DTYPES[dtype]
            )
            row["reload_max_abs_diff"] = (logits(again.to(device).eval()) - want).abs().max().item()
        row["ok"] = (
            math.isfinite(row["ppl"])
            and abs(row["achieved_ratio"] - 0.2) <= 0.011
            and row["reload_max_abs_diff"] <= TOL[dtype]
        )
    except Exception as exc:  # noqa: BLE001  (recorded; the other cases still run)
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    rows.append(row)
    print(json.dumps(row), flush=True)

result = {"device": device, "nsamples": nsamples, "seqlen": seqlen, "rows": rows}
dense_ppl = ppl(dense.to(device))
result["dense_ppl"] = dense_ppl
ok = all(r["ok"] for r in rows)
here, cpu = ("slimgpt", "fp32", device), ("slimgpt", "fp32", "cpu")
if device != "cpu" and here in plans and cpu in plans:  # the same prune on cuda and on cpu
    ppls = {r["device"]: r.get("ppl") for r in rows if r["method"] == "slimgpt" and r["dtype"] == "fp32"}
    rel = abs(ppls[device] / ppls["cpu"] - 1)
    same = sum(a == b for a, b in zip(plans[here], plans[cpu]))
    result["cuda_vs_cpu"] = {"ppl_rel_diff": rel, "layers_same_shape": same, "layers": len(plans[cpu])}
    ok &= rel <= 0.05
result["ok"] = ok
with open(out, "w") as f:
    json.dump(result, f, indent=2)
print(f"dense ppl {dense_ppl:.2f}; " + "; ".join(
    f"{r['method']} {r['dtype']} {r['device']}: "
    + (f"ppl {r['ppl']:.2f}" if "ppl" in r else r.get("error", "?")[:60])
    for r in rows
))
print("e2e ok" if ok else "e2e FAILED")
sys.exit(0 if ok else 1)
EOF
}

# ---- running, recording, summarising ------------------------------------------------------

RESULTS="$OUT_DIR/.results.tsv"
: >"$RESULTS"
declare -A STATUS

record() { # NAME STATUS RC SECONDS NOTE
    STATUS[$1]=$2
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$RESULTS"
    printf '== gpu_check: %-18s %-8s %6s s  %s\n' "$1" "$2" "$4" "$5"
}

wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

run_step() { # NAME [NEEDS...]: run step_NAME under its timeout unless a need failed
    local name=$1 need
    shift
    for need in "$@"; do
        if [ "${STATUS[$need]:-}" != ok ]; then
            record "$name" skip - 0 "needs $need (${STATUS[$need]:-not run})"
            return
        fi
    done
    local left=$((BUDGET - ($(date +%s) - START))) limit=${LIMIT[$name]}
    if [ "$left" -lt "$MIN_STEP" ]; then
        record "$name" skip - 0 "budget of ${BUDGET} s spent"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== gpu_check: $name (limit ${limit} s) ..."
    local t0=$EPOCHREALTIME rc
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "step_$name" prune_7b_with); step_$name" \
        >"$LOGS/$name.log" 2>&1
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    local note
    # shellcheck disable=SC1003  # (a backslash inside single quotes: tr deletes it)
    note=$(grep -v '^[[:space:]]*$' "$LOGS/$name.log" | tail -n 1 | tr -d '\000-\037"\\' | cut -c1-100)
    [ -n "$note" ] || note="exit $rc, no output"
    case $rc in
        0) record "$name" ok 0 "$secs" "$note" ;;
        124 | 137) record "$name" timeout "$rc" "$secs" "after ${limit} s: $note" ;;
        *) record "$name" fail "$rc" "$secs" "$note" ;;
    esac
}

summarise() {
    local total=$(($(date +%s) - START)) failed=0 name status rc secs note
    {
        printf '{\n  "dry_run": %s,\n  "budget_seconds": %s,\n  "total_seconds": %s,\n' \
            "$([ "$DRY" = 1 ] && echo true || echo false)" "$BUDGET" "$total"
        printf '  "device": "%s",\n  "steps": [' "$DEVICE"
        local sep=""
        while IFS=$'\t' read -r name status rc secs note; do
            printf '%s\n    {"step": "%s", "status": "%s", "rc": "%s", "seconds": %s, "log": "logs/%s.log", "note": "%s"}' \
                "$sep" "$name" "$status" "$rc" "$secs" "$name" "$note"
            sep=","
        done <"$RESULTS"
        printf '\n  ]\n}\n'
    } >"$OUT_DIR/summary.json"
    echo
    echo "== gpu_check summary ($([ "$DRY" = 1 ] && echo "dry run, CPU" || echo GPU)): $total s of a ${BUDGET} s budget; out: $OUT_DIR"
    printf '%-20s %-8s %8s  %s\n' step status seconds note
    while IFS=$'\t' read -r name status rc secs note; do
        printf '%-20s %-8s %8s  %s\n' "$name" "$status" "$secs" "${note:0:70}"
        [ "$status" = ok ] || failed=1
    done <"$RESULTS"
    return "$failed"
}

finish() {
    trap - EXIT INT TERM
    summarise
    local rc=$?
    rm -f "$RESULTS"
    # logs.tar.gz instead of the logs folder: the device tool returns at most 8 files
    tar -czf "$OUT_DIR/logs.tar.gz" -C "$OUT_DIR" logs && rm -rf "$LOGS"
    rm -rf "$SCRATCH/tmp"
    if [ "$OWN_SCRATCH" = 1 ] && [ "$KEEP_MODELS" = 0 ]; then
        rm -rf "$SCRATCH"
    fi
    exit "$rc"
}
trap finish EXIT
trap 'echo "gpu_check: interrupted"; exit 130' INT TERM

write_e2e
cat README.md ARCHITECTURE.md benchmarks/RESULTS.md >"$SCRATCH/calib.txt"
cat slimops/*.py >"$SCRATCH/heldout.txt"
echo "== gpu_check: $([ "$DRY" = 1 ] && echo "DRY RUN on CPU" || echo "GPU run"), steps $STEPS, budget $BUDGET s, out $OUT_DIR"

wanted env && run_step env
wanted build && run_step build
wanted tests && run_step tests
wanted e2e && run_step e2e
wanted torchrun && run_step torchrun
wanted hessian && run_step hessian
wanted obs && run_step obs
wanted slice_gemm && run_step slice_gemm
wanted shaped_7b && run_step shaped_7b
wanted prune_7b && run_step prune_7b shaped_7b
if wanted prune_7b && [ "${STATUS[shaped_7b]:-}" = ok ] && [ "${STATUS[prune_7b]}" != ok ]; then
    run_step prune_7b_magnitude shaped_7b # a pruned copy all the same, for the throughput
    [ "${STATUS[prune_7b_magnitude]}" = ok ] && STATUS[prune_7b]=ok
fi
if wanted throughput; then
    if wanted prune_7b; then run_step throughput prune_7b; else run_step throughput; fi
fi
wanted bench_prune && run_step bench_prune
exit 0 # finish (the EXIT trap) summarises and sets the status
