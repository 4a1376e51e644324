#!/bin/bash
# GPU speed, second pass (issue 19) as device commands, from the repository root:
#   bash benchmarks/gpu/run_speed2_device.sh warmup   # ceiling, GEMM ceiling at the slab, warm-up children (cold,
#                                                     # warm same dir, warm from the project's cache file), profile, HF sdpa
#   bash benchmarks/gpu/run_speed2_device.sh rest     # FP8 mlp vs bf16 (both compiled), GPTQ 8-bit packed peak;
#                                                     # returns the compile-cache files in parts
#   bash benchmarks/gpu/run_speed2_device.sh flex     # flex_attention kernel configurations at head dim 256 (bench_flex.py)
#   bash benchmarks/gpu/run_speed2_device.sh flexwarm # the forward configurations, then warm-up children (cold, warm from
#                                                     # the project's cache) with the fastest; profile; HF sdpa
#   bash benchmarks/gpu/run_speed2_device.sh stream   # TTA with streamed encoding vs encode-first (same warm process),
#                                                     # cold and warm children, profile, HF sdpa
#   bash benchmarks/gpu/run_speed2_device.sh fresh    # a fresh machine with .ccache/ (the files `rest` returned):
#                                                     # warm-up from the project's cache file, profile; LoRA training
# .whl/ (pydantic etc.; docs/gpu.md) carried; .whl3/ (GPTQModel) for `rest`; .ccache/ for `fresh`. TINY=1: on CPU.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GPTQMODEL_DISABLE_PACK_EXT=1
R=$PWD
OUT=${OUT:-/tmp/speed2}
mkdir -p "$OUT"
T0=$(date +%s)
STORE=/tmp/arena-cc/shared_store
mkdir -p "$STORE"
if [ -z "$TINY" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$R
  PY=python3
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import os,torch._inductor.config as c; print('cpus', len(os.sched_getaffinity(0)), 'compile_threads', c.compile_threads)"
  SIZE=(--rows "${ROWS:-256}" --slabs 16384)
else
  PY=.venv/bin/python
  SIZE=(--tiny --rows 32 --slabs 1024 --max-length 512)
fi
echo "install: $(( $(date +%s) - T0 )) s"
case "$1" in
  warmup)
    timeout 570 $PY benchmarks/gpu/bench_gpu.py --out "$OUT" --phases ceiling,gemmslab,warmup "${SIZE[@]}" \
      --extra-slabs "${EXTRA_SLABS:-32768}" --cache-root /tmp/arena-cc --child-timeout "${CHILD_TIMEOUT:-140}" 2>&1 \
      | grep -v "it/s\]\|s/it\]\|Warning\|warn(" > "$OUT/main.log"
    ;;
  rest)
    [ -z "$TINY" ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/qsite .whl3/*.whl || exit 1; export PYTHONPATH=/tmp/site:/tmp/qsite:$R; }
    export ARENA_COMPILE_CACHE=$STORE
    timeout "${BENCH_TIMEOUT:-420}" $PY benchmarks/gpu/bench_gpu.py --out "$OUT" --phases ceiling,fp8,gptq "${SIZE[@]}" \
      --fp8-compiled-only 1 --fp8-scope mlp --fp8-granularity row --q-attn arena_flex --q-batch 8 --q-len 2048 2>&1 \
      | grep -v "it/s\]\|s/it\]\|Warning\|warn(" > "$OUT/main.log"
    ls -la "$STORE"
    # the compile-cache files travel back in parts of < 16 MB (the device returns at most 16 MB a file)
    (cd /tmp/arena-cc && tar czf - shared_store | split -b 15m -d - "$OUT/ccache.tgz.part")
    ;;
  flex)  # flex_attention kernel configurations at head dim 256, each in a fresh process (bench_flex.py)
    timeout "${BENCH_TIMEOUT:-570}" $PY benchmarks/gpu/bench_gpu.py --out "$OUT" --phases ceiling,flexprobe "${SIZE[@]}" \
      --cache-root /tmp/arena-cc --flex-mode "${FLEX_MODE:-fwd,fwdbwd}" --flex-budget "${FLEX_BUDGET:-350,180}" \
      --flex-slabs 4 --flex-child-timeout "${CHILD_TIMEOUT:-200}" ${FLEX_CONFIGS:+--flex-configs "$FLEX_CONFIGS"} 2>&1 \
      | grep -v "it/s\]\|s/it\]\|Warning\|warn(" > "$OUT/main.log"
    ;;
  flexwarm)  # the forward configurations, then the project's TTA warm-up children with the fastest one
    timeout "${BENCH_TIMEOUT:-570}" $PY benchmarks/gpu/bench_gpu.py --out "$OUT" --phases ceiling,flexprobe,warmup "${SIZE[@]}" \
      --cache-root /tmp/arena-cc --flex-mode fwd --flex-budget "${FLEX_BUDGET:-200}" --flex-slabs 4 --flex-adopt 1 \
      --flex-child-timeout 90 --warmup-roles "${ROLES:-cold,warm_project_cache}" --sdpa "${SDPA:-1}" \
      --child-timeout "${CHILD_TIMEOUT:-150}" ${FLEX_CONFIGS:+--flex-configs "$FLEX_CONFIGS"} 2>&1 \
      | grep -v "it/s\]\|s/it\]\|Warning\|warn(" > "$OUT/main.log"
    ;;
  flextrain)  # more forward configurations and the training forward+backward ones; TTA with the fastest
              # forward (warm-up child with the HF sdpa baseline); packed compiled LoRA training
    timeout "${BENCH_TIMEOUT:-570}" $PY benchmarks/gpu/bench_gpu.py --out "$OUT" --phases ceiling,flexprobe,warmup,train "${SIZE[@]}" \
      --cache-root /tmp/arena-cc --flex-mode fwd,fwdbwd --flex-budget "${FLEX_BUDGET:-200,100}" --flex-slabs 4 --flex-adopt 1 \
      --flex-child-timeout 90 --warmup-roles warm_project_cache --sdpa 1 --child-timeout "${CHILD_TIMEOUT:-150}" \
      --train-configs "${TRAIN_CONFIGS:-2000:4:0:arena_flex:pc,2000:6:0:arena_flex:pc}" --train-steps 8 --train-warmup 3 \
      ${FLEX_CONFIGS:+--flex-configs "$FLEX_CONFIGS"} 2>&1 | grep -v "it/s\]\|s/it\]\|Warning\|warn(" > "$OUT/main.log"
    ;;
  stream)  # TTA with the table encoded in chunks while the GPU runs (issue 19, fourth pass): cold child (compile,
           # profile), warm child from the project's cache: streamed vs encode-first interleaved, profile, HF sdpa
    timeout "${BENCH_TIMEOUT:-540}" $PY benchmarks/gpu/bench_gpu.py --out "$OUT" --phases ceiling,warmup "${SIZE[@]}" \
      --cache-root /tmp/arena-cc --warmup-roles "${ROLES:-cold,warm_project_cache}" --sdpa "${SDPA:-1}" --ab 1 \
      --reps "${REPS:-3}" --extra-slabs "${EXTRA_SLABS:-}" --child-timeout "${CHILD_TIMEOUT:-240}" 2>&1 | grep -v "it/s\]\|s/it\]\|Warning\|warn(" > "$OUT/main.log"
    ;;
  fresh)
    [ -d .ccache ] && cat .ccache/ccache.tgz.part* | tar xzf - -C /tmp/arena-cc && ls -la "$STORE"
    timeout "${BENCH_TIMEOUT:-400}" $PY benchmarks/gpu/bench_gpu.py --out "$OUT" --phases "${PHASES:-ceiling,warmup,train}" "${SIZE[@]}" \
      --cache-root /tmp/arena-cc --shared-store "$STORE" --warmup-roles warm_project_cache --sdpa "${SDPA:-0}" \
      --train-configs "${TRAIN_CONFIGS:-2000:4:0:arena_flex:pc}" --train-steps 8 --train-warmup 3 \
      --child-timeout "${CHILD_TIMEOUT:-300}" 2>&1 | grep -v "it/s\]\|s/it\]\|Warning\|warn(" > "$OUT/main.log"
    ;;
esac
echo "bench rc=$?"
tail -40 "$OUT/main.log"
ls -la "$OUT" "$OUT"/child_* 2>/dev/null; echo "total: $(( $(date +%s) - T0 )) s"
