#!/usr/bin/env bash
# Everything a GPU session runs, in one call (the GPU test machine: Python 3.12, torch 2.11, triton 3.6, nvcc,
# no package registry):  bash scripts/gpu_run.sh LOGDIR
# It installs bertfast against the torch already there, runs the tests marked gpu, the whole suite, the
# benchmarks with timing, and the kernel resource report; every log and the benchmark JSON/PNG land in LOGDIR.
# The image has no `datasets`: run scripts/gpu_wheels.sh here first and carry .whl, or the data and trainer tests
# skip.
#
# A device call is limited to 10 minutes, and the machine stays warm (with its build) between calls, so the stages
# can be split across calls: bash scripts/gpu_run.sh LOGDIR [install] [gpu] [bench] [report] [suite]
# (no stage named: all of them, in this order).
set -uo pipefail
LOG=${1:?usage: bash scripts/gpu_run.sh LOGDIR [install] [gpu] [bench] [report] [suite]}
shift
STAGES=" ${*:-install gpu bench report suite} "
for s in $STAGES; do
    case $s in install|gpu|bench|report|suite) ;; *) echo "gpu_run.sh: unknown stage '$s' (install gpu bench report suite)"; exit 2;; esac
done
want() { [[ $STAGES == *" $1 "* ]]; }
mkdir -p "$LOG"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export BERTFAST_GPU_COMPILE=all  # tests/test_gpu_compile.py: the whole sm_80/sm_90 matrix (the CPU suite does part)
status=0
step() { echo "== $*" | tee -a "$LOG/summary.txt"; }

step "versions"
{ nvidia-smi; nvcc --version; $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device visible to torch')"; } > "$LOG/versions.txt" 2>&1
tail -3 "$LOG/versions.txt" | tee -a "$LOG/summary.txt"

if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels (scripts/gpu_wheels.sh): datasets and its helpers
    step "carried wheels: $(ls .whl | tr '\n' ' ')"
    SITE=${TMPDIR:-/tmp}/bertfast-site
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            > "$LOG/wheels.log" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        tail -20 "$LOG/wheels.log" | tee -a "$LOG/summary.txt"; echo "carried wheels did not install" | tee -a "$LOG/summary.txt"
        status=1
    fi
else
    step "no .whl/: tests that need \`datasets\` will skip (scripts/gpu_wheels.sh fetches it)"
fi

if want install; then
    # BERTFAST_CUDA=1: the CUDA kernels are wanted here, so a GPU the build fails to see is an error, not a
    # silent CPU-only build (setup.py builds them when a GPU is visible or this asks).
    step "install: BERTFAST_CUDA=1 pip install --no-build-isolation --no-deps -e ."
    if ! BERTFAST_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . > "$LOG/install.log" 2>&1; then
        tail -40 "$LOG/install.log"; echo "install failed" | tee -a "$LOG/summary.txt"; exit 1
    fi
fi

if want gpu; then
    step "gpu tests: pytest -m gpu"
    $PY -m pytest tests -m gpu -q -ra > "$LOG/tests_gpu.log" 2>&1 || status=1
    tail -15 "$LOG/tests_gpu.log" | tee -a "$LOG/summary.txt"
fi

if want bench; then
    step "benchmarks: pytest bench/ --benchmark"
    $PY -m pytest bench/ --benchmark -q -ra > "$LOG/bench.log" 2>&1 || status=1
    tail -15 "$LOG/bench.log" | tee -a "$LOG/summary.txt"
    cp bench/results/*.json bench/results/*.png bench/RESULTS.md "$LOG/" 2>/dev/null
fi

if want report; then
    step "kernel report"
    $PY -m bertfast.kernels.report > "$LOG/kernel_report.txt" 2>&1 || status=1
fi

if want suite; then
    # includes tests/test_sync_free.py::test_steady_state_steps_never_synchronise_on_a_gpu (needs the carried
    # wheels): optimizer steps 2-5 of training runs under torch.cuda.set_sync_debug_mode("error"), where only the
    # trainer's counted host_read may synchronise
    step "whole suite (CPU tests included)"
    $PY -m pytest tests -q -ra > "$LOG/tests_all.log" 2>&1 || status=1
    tail -5 "$LOG/tests_all.log" | tee -a "$LOG/summary.txt"
fi
echo "== done (exit $status); logs in $LOG"
exit $status
