#!/bin/bash
# The GPU end-to-end run (issue 15) as one device command, from the repository root:
#   bash benchmarks/gpu/run_e2e_device.sh full 500
# with .whl/ (Dagster, pydantic, submitit, bitsandbytes: scripts in docs/gpu.md) and .whl3/ (GPTQModel +
# optimum: benchmarks/gpu/gptq_wheels.txt) and .e2e/arena-real-sample/ carried (git-ignored folders).
# Writes gpu_e2e.json, the log and the step logs of the second interpreter into $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GPTQMODEL_DISABLE_PACK_EXT=1 TORCH_LOGS=recompiles
R=$PWD
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/qsite .whl3/*.whl || exit 1
printf '#!/bin/sh\nexport PYTHONPATH=/tmp/qsite:/tmp/site:%s\nexec python3 "$@"\n' "$R" > /tmp/qpy && chmod +x /tmp/qpy
export ARENA_QUANT_PYTHON=/tmp/qpy PYTHONPATH=/tmp/site:$R
echo "install: $(( $(date +%s) - T0 )) s"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
python3 -c "import torch,transformers,peft,dagster,bitsandbytes,pydantic;print('main env', torch.__version__,transformers.__version__,peft.__version__,dagster.__version__,bitsandbytes.__version__,pydantic.__version__)" 2>&1 | tail -1
/tmp/qpy -c "import gptqmodel,optimum.gptq;print('quant env gptqmodel', gptqmodel.__version__)" 2>&1 | tail -1
if [ -f .e2e/inductor.tgz ]; then mkdir -p /tmp && tar xzf .e2e/inductor.tgz -C /tmp && echo "inductor cache restored"; fi

timeout "${2:-480}" python3 benchmarks/gpu/bench_e2e.py --scale "$1" --out "$OUT" --real "$R/.e2e/arena-real-sample" > "$OUT/e2e.log" 2>&1
echo "bench rc=$?"
grep -v "it/s\]\|s/it\]\|Warning\|warn(\|DEBUG" "$OUT/e2e.log" | tail -60
[ "${KEEP_CACHE:-0}" = 1 ] && tar czf "$OUT/inductor.tgz" -C /tmp torchinductor_root 2>/dev/null
(cd /tmp/arena-e2e/artifacts && tar czf "$OUT/steplogs.tgz" .compute quantized_model/*/quantization.json 2>/dev/null)
gzip -f "$OUT/e2e.log"
ls -la "$OUT"; echo "total: $(( $(date +%s) - T0 )) s"
