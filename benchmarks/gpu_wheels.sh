#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks (docs/gpu.md) into wheels/ (or the folder given):
#   benchmarks/gpu_wheels.sh            # for the GPU machine: CPython 3.12, manylinux x86-64
#   GPU_PYTHON=3.11 benchmarks/gpu_wheels.sh /tmp/wheels-311    # the same set for another Python
# That machine has torch, transformers, accelerate, peft, tokenizers, safetensors, pyarrow and pytest
# but no network. miopt itself needs nothing more there (datasets and math-verify are imported only
# where used; matplotlib is optional). What is brought:
#   * TRL's DPOTrainer, for the throughput comparison: trl and the packages it imports that the machine
#     lacks (datasets, dill, multiprocess, xxhash, pandas and pandas' dateutil/six/pytz/tzdata);
#   * setuptools and wheel, so that `pip install --no-deps --no-index --find-links wheels -e .` can
#     build the editable install without an index.
# pandas 2.3 rather than 3.x: it also runs on numpy 1.26 (pandas 3 needs numpy >= 2).
# Every wheel is pinned and downloaded without dependencies; benchmarks/gpu_check.py installs the
# ones whose distribution is missing with `pip install --no-deps --no-index`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-wheels}"
PYTHON_VERSION="${GPU_PYTHON:-3.12}"
ABI="cp${PYTHON_VERSION/./}"
WHEELS=(
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
    pandas==2.3.3 python-dateutil==2.9.0.post0 six==1.17.0 pytz==2025.2 tzdata==2025.2
    setuptools==80.9.0 wheel==0.45.1
)
mkdir -p "$DEST"
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version "$PYTHON_VERSION" --implementation cp --abi "$ABI" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
