#!/usr/bin/env bash
# Everything a GPU session runs, in one call (the GPU test machine: Python 3.12, torch 2.11, triton 3.6, nvcc,
# no package registry):  bash scripts/gpu_run.sh LOGDIR
# It installs bertfast against the torch already there, runs the tests marked gpu, the whole suite, the
# benchmarks with timing, and the kernel resource report; every log and the benchmark JSON/PNG land in LOGDIR.
set -uo pipefail
LOG=${1:?usage: bash scripts/gpu_run.sh LOGDIR}
mkdir -p "$LOG"
PY=${PYTHON:-python}
status=0
step() { echo "== $*" | tee -a "$LOG/summary.txt"; }

step "versions"
{ nvidia-smi; $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; nvcc --version; } > "$LOG/versions.txt" 2>&1
tail -3 "$LOG/versions.txt" | tee -a "$LOG/summary.txt"

step "install: pip install --no-build-isolation --no-deps -e ."
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$LOG/install.log" 2>&1; then
    tail -40 "$LOG/install.log"; echo "install failed" | tee -a "$LOG/summary.txt"; exit 1
fi

step "gpu tests: pytest -m gpu"
$PY -m pytest tests -m gpu -q -ra > "$LOG/tests_gpu.log" 2>&1 || status=1
tail -15 "$LOG/tests_gpu.log" | tee -a "$LOG/summary.txt"

step "benchmarks: pytest bench/ --benchmark"
$PY -m pytest bench/ --benchmark -q -ra > "$LOG/bench.log" 2>&1 || status=1
tail -15 "$LOG/bench.log" | tee -a "$LOG/summary.txt"
cp bench/results/*.json bench/results/*.png bench/RESULTS.md "$LOG/" 2>/dev/null

step "kernel report"
$PY -m bertfast.kernels.report > "$LOG/kernel_report.txt" 2>&1 || status=1

step "whole suite (CPU tests included)"
$PY -m pytest tests -q -ra > "$LOG/tests_all.log" 2>&1 || status=1
tail -5 "$LOG/tests_all.log" | tee -a "$LOG/summary.txt"
exit $status
