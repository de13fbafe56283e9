#!/usr/bin/env bash
# One command for a CUDA machine: build, the GPU tests and every benchmark, time-boxed (<= 10
# minutes of wall time, cold caches), JSONs under benchmarks/results/ written row by row.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run [--json]] [--check-only] [--skip-build]
#                                     [--budget SECONDS] [--logs DIR]
#
# --dry-run (no GPU needed) lists every step with its timeout, expected Triton compiles and
# expected seconds, and the worst case. The steps and the time box are in benchmarks/gpu_check.py
# (its docstring says what each step does); this wrapper finds the interpreter and runs it.
# Never reaches a package registry (pip runs with --no-index --no-build-isolation --no-deps).
# PYTHON names the interpreter with torch (default: python3, else python). Exit status: 0 when
# every step passed, 1 when one failed, timed out or was skipped, 2 when there is no GPU.
set -u
CALLER_PWD=$PWD
cd "$(dirname "$0")/.."
for arg in "$@"; do
    case "$arg" in
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    esac
done
PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
case "$PY" in
    */*) [ "${PY#/}" = "$PY" ] && PY="$CALLER_PWD/$PY" ;;  # a relative path, from where we were called
esac
if ! why=$("$PY" -c "import torch" 2>&1); then
    echo "error: $PY cannot import torch ($(printf '%s\n' "$why" | tail -n 1)); name the interpreter that has it: PYTHON=/path/to/python" >&2
    exit 2
fi
export PYTHON="$PY"
exec "$PY" benchmarks/gpu_check.py --caller-cwd "$CALLER_PWD" "$@"
