#!/usr/bin/env bash
# One command for a CUDA machine: build, CUDA tests, benchmarks, JSONs under benchmarks/results/.
#
# Usage: bash benchmarks/gpu_check.sh [--check-only] [--skip-build] [--budget SECONDS] [--logs DIR]
#
# Needs a CUDA GPU and a CUDA torch (plus triton) already installed; never reaches a package
# registry (pip runs with --no-index --no-build-isolation --no-deps). Steps, each under `timeout`
# and all under one overall budget (default 470 s, i.e. within 8 minutes on an H200), so that one
# hang cannot eat the rest:
#
#   0. env          python, torch, triton, numpy, GPU, nvcc: the first line of the summary
#   1. build        pip install --no-build-isolation --no-deps -e .  (C++/CUDA channel gather);
#                   if the CUDA build fails, a C++-only build (RNIP_EXT_BUILD=cpu) so that the
#                   Triton kernels are still tested and measured (the summary says so)
#   2. tests        RNIP_TEST_DEVICE=cuda pytest tests/kernels tests/ops tests/nn (compiled kernels;
#                   8 pytest-xdist workers when it is installed, so kernel compiles run in parallel;
#                   stops after 25 failures)
#   3. bn_speed     VGG-16 CIFAR + ResNet-50 sets, fp32/bf16/fp16, NCHW + channels_last,
#                   training step and forward: plain vs paper vs ours   -> bn_speed_cuda.json
#   4. net_speed    whole VGG-16 CIFAR training step, batch 128: plain vs paper vs ours, images/s
#                                                                         -> net_speed_cuda.json
#   5. bn_compiled  VGG-16 CIFAR training step: torch.compile of the paper's layer vs ours
#                                                                   -> bn_speed_cuda_compiled.json
#   6. gather_speed channel gather on CUDA                               -> gather_speed_cuda.json
#   7. prune_speed  physical pruning on CUDA                             -> prune_speed_cuda.json
#
# Logs go to DIR/<step>.log (default benchmarks/results/gpu_check_logs); the last lines summarise
# each step. Exit status: 0 when every step passed, 1 when one failed or timed out, 2 when there
# is no GPU. PYTHON names the interpreter (default: python3, else python).

set -u  # bash >= 4.4: empty arrays expand under set -u; ${a[-1]} needs >= 4.3
CALLER_PWD=$PWD
cd "$(dirname "$0")/.."

BUDGET=470
CHECK_ONLY=0
SKIP_BUILD=0
LOGS=benchmarks/results/gpu_check_logs
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        --check-only) CHECK_ONLY=1 ;;
        --skip-build) SKIP_BUILD=1 ;;
        --budget) shift; BUDGET="${1:?--budget needs a number of seconds}" ;;
        --logs) shift; LOGS="${1:?--logs needs a folder}"; [ "${LOGS#/}" = "$LOGS" ] && LOGS="$CALLER_PWD/$LOGS" ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
case "$PY" in
    */*) [ "${PY#/}" = "$PY" ] && PY="$CALLER_PWD/$PY" ;;  # a relative path, from where we were called
esac
if ! why=$("$PY" -c "import torch" 2>&1); then
    echo "error: $PY cannot import torch ($(printf '%s\n' "$why" | tail -n 1)); name the interpreter that has it: PYTHON=/path/to/python" >&2
    exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: no CUDA GPU visible to $PY's torch (torch.cuda.is_available() is False)" >&2
    exit 2
fi
"$PY" -c "import triton" 2>/dev/null || { echo "error: triton is not importable by $PY" >&2; exit 2; }
if [ "$CHECK_ONLY" = 1 ]; then
    "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
    exit 0
fi

mkdir -p "$LOGS"
export PIP_NO_INDEX=1 MAX_JOBS="${MAX_JOBS:-16}" RNIP_EXT_BUILD="${RNIP_EXT_BUILD:-auto}"
SUMMARY=()
FAILED=0

# run NAME SECONDS COMMAND...: COMMAND under `timeout`, capped by what is left of the budget.
run() {
    local name=$1 want=$2; shift 2
    local left=$((BUDGET - SECONDS))
    local limit=$((want < left ? want : left))
    if [ "$limit" -lt 10 ]; then
        SUMMARY+=("$name: SKIPPED (budget spent)"); FAILED=1; return
    fi
    echo "== $name (timeout ${limit}s, ${SECONDS}s elapsed)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    local took=$((SECONDS - start))
    if [ $rc -eq 0 ]; then
        SUMMARY+=("$name: ok (${took}s)")
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        SUMMARY+=("$name: TIMEOUT after ${took}s (log: $LOGS/$name.log)"); FAILED=1
    else
        SUMMARY+=("$name: FAILED rc=$rc (${took}s, log: $LOGS/$name.log)"); FAILED=1
    fi
}

timeout 60 "$PY" - >"$LOGS/env.log" 2>&1 <<'PYEOF'
import platform, shutil, sys
import torch
parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
for name in ("triton", "numpy"):
    try:
        parts.append(f"{name} {__import__(name).__version__}")
    except ImportError:
        parts.append(f"{name} missing")
parts.append(torch.cuda.get_device_name(0))
parts.append(f"nvcc {shutil.which('nvcc') or 'not on PATH'}")
print(" | ".join(parts))
PYEOF
SUMMARY+=("env: $(tail -n 1 "$LOGS/env.log")")

if [ "$SKIP_BUILD" = 0 ]; then
    run build 90 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
    if [ "${SUMMARY[-1]#build: ok}" = "${SUMMARY[-1]}" ]; then
        # Without the CUDA gather the package falls back to index_select; the kernels need no build.
        run build_cpu_only 60 env RNIP_EXT_BUILD=cpu "$PY" -m pip install --no-build-isolation --no-deps \
            --no-index -e .
    fi
fi
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n 8)
fi
run tests 100 env RNIP_TEST_DEVICE=cuda "$PY" -m pytest -q --maxfail=25 -p no:cacheprovider "${XDIST[@]}" \
    tests/kernels tests/ops tests/nn
run bn_speed 100 "$PY" benchmarks/bn_speed.py --device cuda --sets vgg16_cifar resnet50_imagenet \
    --dtypes fp32 bf16 fp16 --layouts nchw channels_last --modes fwdbwd fwd \
    --variants plain paper ours --repeats 20
run net_speed 75 "$PY" benchmarks/net_speed.py --device cuda --batch 128 --amp fp32 bf16 \
    --layouts nchw channels_last --repeats 20
# The issue's targets need the three steps above and this one; gather/prune have none, so they
# come last, where a budget spent on compiles costs least.
run bn_compiled 60 "$PY" benchmarks/bn_speed.py --device cuda --sets vgg16_cifar --dtypes fp16 \
    --layouts channels_last --modes fwdbwd --variants compiled ours --repeats 20 \
    --out bn_speed_cuda_compiled.json
run gather_speed 30 "$PY" benchmarks/gather_speed.py --device cuda --repeats 10
run prune_speed 40 "$PY" benchmarks/prune_speed.py --device cuda --repeats 5

echo
echo "gpu_check summary (${SECONDS}s of ${BUDGET}s):"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "JSONs: benchmarks/results/*_cuda*.json -- commit them with the logs' machine line."
exit $FAILED
