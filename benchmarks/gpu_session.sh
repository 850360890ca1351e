#!/usr/bin/env bash
# One call on the device machine (see /work/.library/device): install carried wheels, check the
# NCCL path end to end, then run the GPU benchmark matrix. Results and logs go to $OUT.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 -c "import torch, rich, numpy; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
# smoke test: 2 workers, a few steps of the 1m preset (NCCL with 2 GPUs; sharing one GPU over
# Gloo with fewer), eager to keep it short
python3 -m lowband.cli train --workers 2 --device cuda --no-compile --steps 6 --eval-every 3 --out /tmp/smoke-$$-$RANDOM 2>&1 | tail -3 || exit 1
for step in "$@"; do
  echo "== $step"
  eval "$step" 2>&1 | tee -a "$OUT/bench.log"
done
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
