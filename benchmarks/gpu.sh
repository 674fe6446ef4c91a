#!/usr/bin/env bash
# The one GPU command: on a lent GPU machine (one command of at most 10 minutes; this script keeps to
# about 9.5 with a time limit per step), from the project's root:
#   install  the carried wheels (.whl/, as the device notes say);
#   data     the smoke's dataset and the benchmarks' (rows of 1024, 8192-token BPE) from the Python source there;
#   smoke    every algorithm on a tiny llama, one GPU under the Composer launcher (world size 1, FSDP2 over NCCL,
#            bf16 autocast, sdpa): yamls/gpu/gpu-{warmup,growth,lora,orchestrator,context}.yaml in one process,
#            each recipe checked and timed (benchmarks/gpu_smoke.py);
#   bench    the sequence-length warmup, growth (surgery, G_stack) and combined benchmarks at the GPT-2-124M shape
#            (12 layers, 768 wide, 12 heads, MLP 3072, rows of 1024), sized to fit (GPU_SH_STEPS, GPU_SH_BATCH);
#   report   one table, printed last: step | result | seconds | key figures (benchmarks/gpu_report.py).
# A failing step does not stop the next; the table says which failed. $OUT (default runs/gpu-out) receives
# table.md, results.json, steps.tsv, smoke.json, bench-{warmup,growth,combined}.json and logs.tar.gz (every
# step's log).
#
#   bash benchmarks/gpu.sh                        # on the GPU machine
#   GPU_SH_DRY_RUN=1 bash benchmarks/gpu.sh       # or `bash benchmarks/gpu.sh --cpu`: the same steps on a CPU,
#                                                 # fp32, gloo, tiny sizes, no install (tests/test_gpu_sh.py)
set -uo pipefail
DRY=${GPU_SH_DRY_RUN:-0}
[ "${1:-}" = --cpu ] && DRY=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/runs/gpu-out}
WORK=${GPU_SH_WORK:-}
if [ -z "$WORK" ]; then WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS" "$WORK/data"
rm -f "$OUT/steps.tsv" "$OUT/smoke.json" "$OUT"/bench-*.json
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# a temp folder of its own: StreamingDataset walks the file locks other runs left in the temp folder
mkdir -p "$WORK/tmp" && export TMPDIR=$WORK/tmp
START=$EPOCHREALTIME
# every step's time limit times SCALE; DEADLINE: seconds from the start by which every step has ended
# (a dry run on a busy CPU is slower than the GPU run: its limits are 5 times as long)
SCALE=${GPU_SH_LIMIT_SCALE:-1}; [ "$DRY" = 1 ] && SCALE=${GPU_SH_LIMIT_SCALE:-5}
DEADLINE=$((${GPU_SH_DEADLINE:-555} * SCALE))

now() { echo "$EPOCHREALTIME $START" | awk '{printf "%.1f", $1 - $2}'; }

# step NAME LIMIT_S COMMAND...: run COMMAND in $WORK with a time limit (times SCALE, cut to what the deadline leaves),
# its output in $LOGS/NAME.log; one line to $OUT/steps.tsv: name, pass / fail / timeout / skipped, seconds, note
# (on a pass: the log's last line starting "note: "; else why)
step() {
  local name=$1 limit=$(($2 * SCALE)); shift 2
  local left log="$LOGS/${name// /-}.log" t0 rc result note=""
  left=$(awk -v d="$DEADLINE" -v n="$(now)" 'BEGIN {printf "%d", d - n - 10}')
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t0\tno time left before the deadline (%s s)\n' "$name" "$DEADLINE" >> "$OUT/steps.tsv"
    echo "== $name: skipped, no time left"; return
  fi
  echo "== $name (limit $limit s)"
  t0=$(now)
  { printf '%q ' "$@"; echo; } > "$log"
  (cd "$WORK" && timeout -k 10 "$limit" "$@") >> "$log" 2>&1
  rc=$?
  case $rc in
    0) result=pass; note=$(grep '^note: ' "$log" | tail -1 | cut -c7-200) ;;
    124|137) result=timeout; note="stopped at its $limit s limit" ;;
    *) result=fail; note="rc=$rc: $(grep -v '^\s*$' "$log" | tail -1 | tr '\t' ' ' | cut -c1-160)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$result" "$(awk -v a="$(now)" -v b="$t0" 'BEGIN {printf "%.1f", a - b}')" \
    "$note" >> "$OUT/steps.tsv"
  echo "== $name: $result ${note:+($note)}"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
}

# -- sizes --------------------------------------------------------------------------------------------------
SMOKE=(warmup growth lora orchestrator context)
if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-python3} DEVICE=cpu PRECISION=fp32
  SMOKE_BYTES=300000 SEQ=64 VOCAB=512 BENCH_BYTES=200000
  STEPS=8 BATCH=4 EVAL_INTERVAL=4 EVAL_BATCHES=1 LR=3e-3
  HIDDEN=32 LAYERS=2 MLP=64 HEADS=2 MIN_SEQ=16 SEQ_STEP=16
  SURGERY=64,2,128,4,512 SURGERY_BATCH=2 SURGERY_SEQ=32
  WARMUP_MODEL=(--tiny)  # a 2-layer, 64-wide llama
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  printf 'install\tskipped\t0\tdry run (CPU, fp32, gloo, tiny sizes)\n' >> "$OUT/steps.tsv"
else
  PY=python3 DEVICE=gpu PRECISION=amp_bf16
  SMOKE_BYTES=4000000 SEQ=1024 VOCAB=8192 BENCH_BYTES=12000000
  STEPS=${GPU_SH_STEPS:-150} BATCH=${GPU_SH_BATCH:-16} EVAL_INTERVAL=25 EVAL_BATCHES=4 LR=6e-4
  HIDDEN=768 LAYERS=12 MLP=3072 HEADS=12 MIN_SEQ=64 SEQ_STEP=64
  SURGERY=768,12,3072,12,$VOCAB SURGERY_BATCH=8 SURGERY_SEQ=1024
  WARMUP_MODEL=()  # the benchmark's full mode: GPT-2-124M (gpt2 family, 12 x 768, 12 heads, MLP 3072)
  step install 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl
  export PYTHONPATH=/tmp/site:$ROOT
  nvidia-smi -L 2>&1 | head -2
fi
DATA=$WORK/data BENCH=$ROOT/benchmarks

# -- data ---------------------------------------------------------------------------------------------------
step data 90 "$PY" -c '
import os, sys
from composer_growth.data import prepare_dataset
note = []
for out, seq, vocab, size in zip(*[iter(sys.argv[1:])] * 4):
    m = prepare_dataset(out, seq_len=int(seq), vocab_size=int(vocab), max_bytes=int(size), val_percent=10)
    s = m["splits"]
    rows = (os.path.basename(out), s["train"]["sequences"], s["val"]["sequences"], m["seq_len"], m["vocab_size"])
    note.append("%s: %d + %d rows of %d, %d-token BPE" % rows)
print("note: " + "; ".join(note))
' "$DATA/smoke" 128 2048 "$SMOKE_BYTES" "$DATA/bench" "$SEQ" "$VOCAB" "$BENCH_BYTES"

# -- smoke: every algorithm, one process under the Composer launcher ------------------------------------------
recipes=()
for r in "${SMOKE[@]}"; do recipes+=("$ROOT/yamls/gpu/gpu-$r.yaml"); done
step smoke 120 "$PY" -m composer.cli.launcher -n 1 "$BENCH/gpu_smoke.py" --out "$OUT/smoke.json" \
  --set device=$DEVICE --set precision=$PRECISION --set data.path="$DATA/smoke" \
  --set data.prepare.max_bytes=$SMOKE_BYTES "${recipes[@]}"

# -- benchmarks at the GPT-2-124M shape (tiny in a dry run) ---------------------------------------------------
COMMON=(--device "$DEVICE" --precision "$PRECISION" --steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ"
        --eval-interval "$EVAL_INTERVAL" --eval-batches "$EVAL_BATCHES" --lr "$LR" --data "$DATA/bench")
step "bench warmup" 95 "$PY" "$BENCH/seq_length_warmup.py" ${WARMUP_MODEL[@]+"${WARMUP_MODEL[@]}"} "${COMMON[@]}" \
  --min-seq-len $MIN_SEQ --step-size $SEQ_STEP --runs baseline,ours-reshape-tokens --out "$OUT/bench-warmup.json"
step "bench growth" 100 "$PY" "$BENCH/growth.py" "${COMMON[@]}" --part all --hidden $HIDDEN --layers $LAYERS \
  --intermediate $MLP --heads $HEADS --runs scratch,gstack-fp --surgery-model $SURGERY \
  --surgery-batch $SURGERY_BATCH --surgery-seq $SURGERY_SEQ --out "$OUT/bench-growth.json"
step "bench combined" 95 "$PY" "$BENCH/tokens_to_loss.py" "${COMMON[@]}" --hidden $HIDDEN --layers $LAYERS \
  --mlp $MLP --heads $HEADS --runs baseline,combined --out "$OUT/bench-combined.json"

# -- the table ------------------------------------------------------------------------------------------------
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
rm -f "$OUT"/*.partial  # tokens_to_loss.py's results so far: $OUT keeps to the eight files above
MODE="GPU"; [ "$DRY" = 1 ] && MODE="CPU dry run"
"$PY" "$BENCH/gpu_report.py" "$OUT" --mode "$MODE" --smoke "$(IFS=,; echo "${SMOKE[*]}")" \
  --wall "$(now)" --steps "$STEPS" --batch "$BATCH" --seq-len "$SEQ"
