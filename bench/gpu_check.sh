#!/usr/bin/env bash
# The one prepared GPU check (a few minutes): bf16 training throughput, MFU and peak memory of the full
# PCRLv2 objective at the paper's size and micro-batch 8-32, fp32 at micro-batch 8 as the baseline, and
# the torch view renderer on the GPU. With SHARDS=<folder made by data_prep.shard> and DeepSpeed installed,
# it also runs the real engine (launch/pretrain.py, base.yaml, bf16 + channels-last, loader workers on the
# CPU) and reports its samples/s and data-wait fraction. Results go to $OUT (default /tmp/pcrl-gpu-check).
# The whole check stays within BUDGET_S seconds (default 450, under the 8 minutes a lent GPU allows):
# each part gets its own limit, cut to what is left.
#   bash bench/gpu_check.sh
#   SHARDS=/data/shards bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pcrl-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# H100 SXM dense bf16 peak (TFLOP/s) for MFU; override for other cards.
PEAK=${PEAK_TFLOPS:-989}
DEADLINE=$((SECONDS + ${BUDGET_S:-450}))

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then echo "== $name skipped: the time budget is spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err" || echo "   $name failed (rc $?), see $name.err"
  $PY - "$OUT/$name.json" <<'PYEOF' 2>/dev/null || true
import json, sys
r = json.load(open(sys.argv[1]))
if "sampler_ms" in r:  # bench/views.py
    print(f"   sampler {r['sampler_ms']['new_volume']:.1f} ms/sample (new volume), load {r['loadavg']['before']:.1f}")
    for k, v in r["results"].items():
        print(f"   {k:10s} B={r['batch']:3d} rendering {v['render_samples_per_s']:8.1f} samples/s "
              f"({v.get('render_x_torchio', float('nan')):6.1f}x torchio per core), "
              f"end to end {v['end_to_end_samples_per_s']:8.1f}")
elif "results" in r:  # bench/train_step.py
    for k, v in r["results"].items():
        mem = v.get("peak_mem_gib", 0)
        print(f"   {k:10s} B={r['batch']:3d} {v['samples_per_s']:8.1f} samples/s {v['tflops']:7.1f} TFLOP/s "
              f"MFU {100 * v.get('mfu', 0):5.1f}% peak {mem:5.1f} GiB")
else:
    print("  ", json.dumps(r))
PYEOF
}

COMMON=(bench/train_step.py --device cuda --base-channels 32 --global-size 64 64 32 --local-size 16 16 16
        --steps 10 --warmup 3 --peak-tflops "$PEAK" --json)
run train_b8 240 $PY "${COMMON[@]}" --batch 8 --variants fp32 bf16 bf16-cl
run train_b16 150 $PY "${COMMON[@]}" --batch 16 --variants bf16 bf16-cl
run train_b32 150 $PY "${COMMON[@]}" --batch 32 --variants bf16 bf16-cl

run views_gpu 120 $PY - <<'PYEOF'
import json, time, torch
from pcrl.config import ViewsConfig
from pcrl.views import PCRLv2Views
views = PCRLv2Views(ViewsConfig())
g = torch.Generator(device="cuda").manual_seed(0)
vol = torch.rand((300, 300, 240), device="cuda", generator=g)
for s in range(5):
    views(vol, seed=s, tissue_threshold=None)
torch.cuda.synchronize(); t0 = time.perf_counter(); n = 100
for s in range(n):
    views(vol, seed=s, tissue_threshold=None)
torch.cuda.synchronize(); dt = (time.perf_counter() - t0) / n
print(json.dumps({"views_ms_per_sample": dt * 1e3, "samples_per_s": 1 / dt, "note": "2 global + 6 local views, paper sizes, one sample per call"}))
PYEOF
# torch and DALI view renderers on the GPU against torchio on one CPU core (bench/views.py, same volumes and
# pre-drawn geometry; GPU variants per wall second, CPU ones per CPU second of one thread)
run views_bench 150 $PY bench/views.py --shards "${SHARDS:-.cache/demo/shards}" --samples 8 --gpu-samples 256 \
  --batch 32 --json
if [ -n "${SHARDS:-}" ] && $PY -c "import deepspeed" 2>/dev/null; then
  echo "== engine (launch/pretrain.py, base.yaml, bf16 + channels-last, micro-batch 16)"
  left=$((DEADLINE - SECONDS)); [ "$left" -lt 300 ] || left=300
  timeout "$left" $PY launch/pretrain.py --config configs/pretrain/base.yaml data.shards="$SHARDS" \
    run.output_dir="$OUT/runs" run.name=engine train.max_steps=60 train.log_every=10 \
    train.micro_batch_size=16 data.num_workers="${WORKERS:-12}" engine.channels_last=true \
    tracking.enabled=false > "$OUT/engine.log" 2>&1 || echo "   engine failed (rc $?), see engine.log"
  grep -E "^step|error|Error" "$OUT/engine.log" | tail -8
  cp "$OUT/runs/engine/metrics.jsonl" "$OUT/engine_metrics.jsonl" 2>/dev/null || true
  # fp16 through DeepSpeed's dynamic loss scaling (CPU runs refuse fp16): the logged optim/loss_scale and
  # optim/skipped_steps show the scaler backing off on overflow and then holding.
  left=$((DEADLINE - SECONDS)); [ "$left" -lt 120 ] || left=120
  if [ "$left" -ge 40 ]; then
    echo "== engine fp16 (DeepSpeed loss scaling, micro-batch 8, 40 steps)"
    timeout "$left" $PY launch/pretrain.py --config configs/pretrain/base.yaml data.shards="$SHARDS" \
      run.output_dir="$OUT/runs" run.name=engine-fp16 train.max_steps=40 train.log_every=10 \
      train.micro_batch_size=8 data.num_workers="${WORKERS:-12}" engine.precision=fp16 \
      tracking.enabled=false > "$OUT/engine_fp16.log" 2>&1 || echo "   engine fp16 failed (rc $?), see engine_fp16.log"
    grep -E "^step|error|Error" "$OUT/engine_fp16.log" | tail -5
    cp "$OUT/runs/engine-fp16/metrics.jsonl" "$OUT/engine_fp16_metrics.jsonl" 2>/dev/null || true
  fi
fi
echo "results in $OUT"
