#!/usr/bin/env bash
# Fetch, on this (CPU) machine, the wheels of the packages bertfast's data pipeline needs that the GPU image lacks
# (`datasets` and its pure-Python helpers dill and multiprocess; the image has pyarrow, pandas, xxhash, fsspec,
# huggingface-hub and tokenizers). They land in .whl/ (git-ignored); a GPU call carries .whl and
# scripts/gpu_run.sh installs them into a private folder before it runs anything:
#   bash scripts/gpu_wheels.sh            # here, once
#   device run: carry [".whl"], command "bash scripts/gpu_run.sh $OUT/logs"
# Versions follow what is installed here (the versions the CPU suite is tested with); override with
# GPU_WHEELS="datasets==X dill==Y multiprocess==Z". PY_VERSION is the GPU image's Python (3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -z "${GPU_WHEELS:-}" ]; then
    GPU_WHEELS=$($PY - <<'PYEOF'
from importlib.metadata import PackageNotFoundError, version
names = ["datasets", "dill", "multiprocess"]
try:
    print(" ".join(f"{n}=={version(n)}" for n in names))
except PackageNotFoundError as e:
    raise SystemExit(f"gpu_wheels.sh: {e.name} is not installed in {__import__('sys').executable}; "
                     "install bertfast here first (pip install -e .) or set GPU_WHEELS")
PYEOF
)
fi
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
$PY -m pip download --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl $GPU_WHEELS
ls -l .whl
echo "now carry .whl in the GPU call (it is git-ignored, $(du -sh .whl | cut -f1))"
