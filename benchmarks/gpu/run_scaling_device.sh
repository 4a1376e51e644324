#!/bin/bash
# 2-GPU TTA scaling with the length-balanced shards (issue 20), from the repository root:
#   bash benchmarks/gpu/run_scaling_device.sh tta2   # on nvidia-h200-x2: 1 GPU cold (compiles, writes the compile
#                                                    # cache), 1 GPU warm, 2 GPUs warm (torchrun), then training 1 and 2
#   bash benchmarks/gpu/run_scaling_device.sh tta1   # on one GPU: the 1-GPU half (cold, warm) as a dry run
# .whl/ carried (pydantic & co, docs/gpu.md). TINY=1: on CPU (gloo), numbers mean nothing.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
R=$PWD
OUT=${OUT:-/tmp/scaling}
mkdir -p "$OUT"
T0=$(date +%s)
CCDIR=/tmp/arena-cc-scaling  # node-local (a shared Slurm file system risks lock trouble: docs/gpu.md)
rm -rf "$CCDIR"; mkdir -p "$CCDIR"
if [ -z "$TINY" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$R
  PY=python3
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
  SIZE=(--rows "${ROWS:-1024}" --attn arena_flex)
else
  PY=.venv/bin/python
  SIZE=(--tiny --rows 24 --max-length 256 --slab 1024 --attn arena_flex)
fi
TR=(-m torch.distributed.run --standalone)
S=benchmarks/gpu/bench_scaling.py
N=0
run() {  # each step's whole log comes back as $OUT/step<N>.log
  N=$((N + 1)); echo "== step$N: $*"
  timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1 | grep -v "it/s\]\|s/it\]\|Warning\|warn(" > "$OUT/step$N.log"
  echo "rc=$?"; grep -E "^scaling |Error|error:" "$OUT/step$N.log" | tail -4
}
echo "install: $(( $(date +%s) - T0 )) s"
run $PY $S --mode tta "${SIZE[@]}" --compile-cache "$CCDIR" --tag _cold --out "$OUT"
run $PY $S --mode tta "${SIZE[@]}" --compile-cache "$CCDIR" --out "$OUT"
if [ "$1" = tta2 ]; then
  run $PY "${TR[@]}" --nproc_per_node 2 $S --mode tta "${SIZE[@]}" --compile-cache "$CCDIR" --out "$OUT"
  # no shared cache: each rank compiles (does the shared cache help?)
  run $PY "${TR[@]}" --nproc_per_node 2 $S --mode tta "${SIZE[@]}" --tag _nocache --out "$OUT"
  if [ -z "$NO_TRAIN" ]; then
    TRAIN=(--mode train --attn arena_flex --packing --seq-len 2000 --micro-batch 2 --steps 6 --grad-accum 8)
    [ -n "$TINY" ] && TRAIN=(--mode train --tiny --attn eager --seq-len 128 --micro-batch 2 --steps 3 --grad-accum 2)
    run $PY $S "${TRAIN[@]}" --out "$OUT"
    run $PY "${TR[@]}" --nproc_per_node 2 $S "${TRAIN[@]}" --out "$OUT"
  fi
fi
ls -la "$OUT"; echo "total: $(( $(date +%s) - T0 )) s"
