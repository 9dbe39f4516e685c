#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py does the work): every step in its own process under its
# own timeout, figures in $OUT (or --out DIR). Under 8 minutes on an H200.
#
#   benchmarks/gpu_check.sh            # on the GPU machine
#   benchmarks/gpu_check.sh --cpu      # tiny sizes on a CPU (--quick works too)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
