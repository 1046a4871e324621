#!/usr/bin/env bash
# The one prepared GPU check (a few minutes), in three parts that can run together or one at a time:
#   views   the view renderers on the GPU: torch and DALI from loader-made batches (bench/views.py, against
#           pcrl's torch renderer on one CPU core of the same machine), and the torch renderer from a whole
#           volume already on the GPU, one sample per call
#   train   bf16 training throughput, MFU and peak memory of the full PCRLv2 objective at the paper's size
#           and micro-batch 8-32, fp32 at micro-batch 8 as the baseline, with and without channels-last, and
#           compiled (bf16 + channels-last + torch.compile of the U-Net, against the same uncompiled) at 32
#   engine  the real engine (launch/pretrain.py, base.yaml, bf16 + channels-last, loader workers on the CPU)
#           with the torch and the DALI renderer: samples/s and data-wait fraction; compiled at micro-batch
#           32 against the same uncompiled (the bench's train_b32_compile setting); then fp16 through
#           DeepSpeed's loss scaling (needs DeepSpeed; skipped without it; ENGINE_RUNS="torch dali compile fp16"
#           picks)
#   evidence  does pretraining help at the paper's width? bench/probe.py (PCRLv2 against random
#           initialisations and the restoration-only ablation on the AAL task) on the GPU, with the CPU
#           recipe's views at base width 32; needs the sample volumes in .cache/samples (the GPU machine has no
#           network: fetch them here with python -m data_prep.fetch --set pretrain, then --source colin27, and carry
#           .cache/samples, 43 MB). EVIDENCE_SEEDS (default "0 1") and EVIDENCE_STEPS (default 300) size it
# Results go to $OUT (default /tmp/pcrl-gpu-check), one JSON or log per run, and a summary on stdout. The
# whole check stays within BUDGET_S seconds (default 450): each run gets its own limit, cut to what is left.
#   bash bench/gpu_check.sh                     # all three parts
#   SHARDS=/data/shards bash bench/gpu_check.sh views engine
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pcrl-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SHARDS=${SHARDS:-.cache/demo/shards}
# H100 SXM dense bf16 peak (TFLOP/s) for MFU; override for other cards.
PEAK=${PEAK_TFLOPS:-989}
DEADLINE=$((SECONDS + ${BUDGET_S:-450}))
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(views train engine evidence)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
$PY - <<'PYEOF' | tee -a "$OUT/gpu.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import nvidia.dali as dali
    print("dali", dali.__version__)
except ImportError as e:
    print("dali: not installed", e)
try:
    import deepspeed
    print("deepspeed", deepspeed.__version__)
except ImportError as e:
    print("deepspeed: not installed", e)
PYEOF

summarise() {  # one line per result of a JSON report
  $PY - "$1" <<'PYEOF' 2>/dev/null || true
import json, sys
r = json.load(open(sys.argv[1]))
if "sampler_ms" in r:  # bench/views.py
    s = r["sampler_ms"]
    print(f"   sampler {s['new_volume']:.1f} ms/sample (new volume), cut {s.get('cut', float('nan')):.1f} ms/sample, "
          f"load {r['loadavg']['before']:.1f}")
    for k, v in r["results"].items():
        print(f"   {k:10s} B={r['batch']:3d} rendering {v['render_samples_per_s']:8.1f} samples/s, "
              f"end to end (one worker core) {v['end_to_end_samples_per_s']:8.1f}")
elif "results" in r:  # bench/train_step.py
    for k, v in r["results"].items():
        mem = v.get("peak_mem_gib", 0)
        print(f"   {k:10s} B={r['batch']:3d} {v['samples_per_s']:8.1f} samples/s {v['tflops']:7.1f} TFLOP/s "
              f"MFU {100 * v.get('mfu', 0):5.1f}% peak {mem:5.1f} GiB")
else:
    print("  ", json.dumps(r))
PYEOF
}

limit_for() {  # label, wanted seconds, least seconds worth starting: prints the limit cut to what is left
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$3" ]; then echo "== $1 skipped: the time budget is spent" >&2; return 1; fi
  echo $(($2 < left ? $2 : left))
}

run() {  # name, timeout, command... (stdout is the JSON report)
  local name=$1 limit t0=$SECONDS
  limit=$(limit_for "$name" "$2" 20) || return 0
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err" || { echo "   $name failed (rc $?):"; tail -4 "$OUT/$name.err"; }
  echo "   ($((SECONDS - t0)) s)"
  summarise "$OUT/$name.json"
}

engine() {  # name, limit, overrides... (bf16 + channels-last from base.yaml unless overridden)
  local name=$1 limit t0=$SECONDS
  limit=$(limit_for "engine $name" "$2" 40) || return 0
  shift 2
  echo "== engine $name (limit ${limit} s): $*"
  timeout "$limit" $PY launch/pretrain.py --config configs/pretrain/base.yaml data.shards="$SHARDS" \
    run.output_dir="$OUT/runs" run.name="$name" train.log_every=10 data.num_workers="${WORKERS:-8}" \
    tracking.enabled=false "$@" > "$OUT/engine-$name.log" 2>&1 || echo "   engine $name failed (rc $?), see engine-$name.log"
  echo "   ($((SECONDS - t0)) s)"
  grep -E "^step|rror" "$OUT/engine-$name.log" | tail -4
  cp "$OUT/runs/$name/metrics.jsonl" "$OUT/engine-$name.metrics.jsonl" 2>/dev/null || true
}

for part in "${PARTS[@]}"; do
  case $part in
  views)
    # loader-made batches (cut and collated on the CPU, pinned) rendered on the GPU by torch and DALI,
    # pcrl's torch renderer on one core of this machine for comparison
    run views_bench 150 $PY bench/views.py --shards "$SHARDS" --variants torch_cpu torch_gpu dali_gpu \
      --samples 16 --gpu-samples 4096 --batch 32 --json
    run views_bench_b64 90 $PY bench/views.py --shards "$SHARDS" --variants torch_gpu dali_gpu \
      --samples 16 --gpu-samples 4096 --batch 64 --json
    run views_volume 90 $PY - <<'PYEOF'
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
print(json.dumps({"views_ms_per_sample": dt * 1e3, "samples_per_s": 1 / dt,
                  "note": "whole 300x300x240 volume on the GPU, sampler included, one sample per call"}))
PYEOF
    ;;
  train)
    COMMON=(bench/train_step.py --device cuda --base-channels 32 --global-size 64 64 32 --local-size 16 16 16
            --steps 10 --warmup 3 --peak-tflops "$PEAK" --json)
    run train_b8 150 $PY "${COMMON[@]}" --batch 8 --variants fp32 bf16 bf16-cl
    run train_b16 90 $PY "${COMMON[@]}" --batch 16 --variants bf16 bf16-cl
    run train_b32 90 $PY "${COMMON[@]}" --batch 32 --variants bf16 bf16-cl
    # inductor compiles the U-Net's three graphs during the warm-up steps (a minute or two on first use)
    run train_b32_compile 240 $PY "${COMMON[@]}" --batch 32 --warmup 5 --variants bf16-cl bf16-cl-compile
    ;;
  engine)
    if ! $PY -c "import deepspeed" 2>/dev/null; then echo "== engine skipped: DeepSpeed is not installed"; continue; fi
    for run_name in ${ENGINE_RUNS:-torch dali compile fp16}; do
      case $run_name in
      torch) engine torch 150 train.max_steps=60 train.micro_batch_size=16 views.backend=torch ;;
      dali)
        if $PY -c "import nvidia.dali" 2>/dev/null; then
          engine dali 150 train.max_steps=60 train.micro_batch_size=16 views.backend=dali
        else
          echo "== engine dali skipped: NVIDIA DALI is not installed"
        fi ;;
      compile)  # the engine at the bench's compiled setting, and the same without compile, in one go
        engine eager32 120 train.max_steps=60 train.micro_batch_size=32 views.backend=torch
        engine compile32 240 train.max_steps=80 train.micro_batch_size=32 views.backend=torch engine.compile=true ;;
      # fp16 (CPU runs refuse it): optim/loss_scale and optim/skipped_steps show the scaler backing off
      fp16) engine fp16 120 train.max_steps=40 train.micro_batch_size=8 engine.precision=fp16 ;;
      esac
    done
    ;;
  evidence)
    # seed-major and resumable: a run cut by the budget leaves whole seeds done; rerun to go on
    limit=$(limit_for evidence 420 120) || continue
    echo "== evidence (limit ${limit} s)"
    timeout "$limit" $PY bench/probe.py --out "$OUT/probe" --seeds ${EVIDENCE_SEEDS:-0 1} --random-inits 5 \
      --steps "${EVIDENCE_STEPS:-300}" --set model.base_channels=32 --set engine.precision=bf16 \
      --set data.num_workers="${WORKERS:-8}" --set tracking.enabled=false > "$OUT/evidence.log" 2>&1 \
      || echo "   evidence stopped (rc $?), see evidence.log; runs are in $OUT/probe/runs"
    tail -12 "$OUT/evidence.log"
    ;;
  *) echo "unknown part $part: views, train, engine or evidence"; exit 2 ;;
  esac
done
echo "results in $OUT"
