# Source at the start of a device call (repository root):  source bench/device_env.sh
# Installs the wheels that bench/devcarry.sh put in .devcarry/whl (carry ".devcarry/whl", ".devcarry/fonts") into
# /tmp/site, points the synth generators at the carried fonts, sets
# PYTHONPATH, keeps NVLink multicast off (KINDS.md) and records the machine in $OUT/env.txt.
if ls .devcarry/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl || return 1
fi
[ -d .devcarry/fonts ] && export QWENVL_FONT_DIRS=$PWD/.devcarry/fonts  # carried: the synth fonts (devcarry.sh)
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
{ date -u +%FT%TZ; git log -1 --format=%h 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  df -h /dev/shm | tail -1
  python3 -c "from qwenvl.synth.common import font_names; print('synth fonts:', ' '.join(font_names()))"
} 2>&1 | tee "$OUT/env.txt"
