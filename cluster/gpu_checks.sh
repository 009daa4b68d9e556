#!/usr/bin/env bash
# Every GPU check that exists today, in one run for a short GPU loan (the `device`
# tool): ~5 minutes on an H100-class GPU after setup. Needs the CUDA build of torch (cluster/README.md).
#   1. the `gpu` tests: the model and the chains on CUDA in segment's actors, distill, the pyfunc;
#   2. pipelines.bench core --device cuda: s/iteration, TFLOP/s against the GPU's measured bf16 peaks, peak memory, top kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_devices.py
"$PY" -m pipelines.bench core --device cuda --presets paper-birds:48 cpu-32:32 cpu-64:32 --iterations 3 --profile --json "${OUT:-.}/bench-core-cuda.json"
