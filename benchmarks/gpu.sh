#!/usr/bin/env bash
# One script for a lent GPU machine (see the project's device notes): install the carried wheels, run the
# GPU-readiness tests and the growth / LoRA / context tests on the GPU, then a short smoke run:
#   one GPU, compiled: warmup with pre-allocation, two growths            (yamls/gpu/gpu-single.yaml)
#   two GPUs, DDP and FSDP2: orchestrator growth with reevaluate,
#   ReLoRA merges with an HF export, context phases with phase exports    (yamls/gpu/gpu-{growth,lora,context}.yaml)
# Logs go under $OUT (default ./gpu-out); recompiles are logged (TORCH_LOGS=recompiles); peak CUDA memory
# allocated / reserved around each surgery comes from benchmarks/gpu_smoke.py. A short table is printed last.
# Run from the project's root:  bash benchmarks/gpu.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
set -uo pipefail
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic cuBLAS for the tests
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT/logs" "$OUT/results"
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
status=()

note() { status+=("$1|$2|$3"); echo "== $1: $2 ($3)"; }

# -- tests on the GPU (the launcher tests need the `composer` console script, absent here) ---------------
if python3 -c 'import pytest' 2>/dev/null; then
  for t in tests/test_gpu_ready.py "tests/test_growth_functional.py tests/test_lora_functional.py" \
           "tests/test_growth.py tests/test_lora_merge.py tests/test_context_schedule.py"; do
    name=$(echo "$t" | tr ' /' '__')
    start=$SECONDS
    # tests that spawn `composer -n 2` on the CPU (two ranks, DDP / FSDP2 matches) need the console script and
    # a second device: left to the smoke runs below
    timeout 150 python3 -m pytest -q -m "not launcher" -p no:cacheprovider \
      -k "not two_ranks and not matches_ddp and not launcher" $t \
      > "$OUT/logs/pytest-$name.log" 2>&1
    rc=$?
    note "pytest $t" "$(tail -1 "$OUT/logs/pytest-$name.log" | cut -c1-60)" "rc=$rc, $((SECONDS - start)) s"
  done
else
  note "pytest" "skipped: pytest is not importable here" "-"
fi

# -- smoke run (about 5 minutes) ------------------------------------------------------------------------
WORK=$(mktemp -d)
cp -r yamls benchmarks scripts "$WORK"/ 2>/dev/null
run_smoke() {  # name, launcher args ("" for one process), recipe, overrides...
  local name=$1 nproc=$2 recipe=$3; shift 3
  local start=$SECONDS rc
  if [ "$nproc" = 1 ]; then
    (cd "$WORK" && TORCH_LOGS=recompiles timeout 100 python3 benchmarks/gpu_smoke.py "$recipe" "$OUT/results" "$@") \
      > "$OUT/logs/$name.log" 2>&1
  else
    (cd "$WORK" && TORCH_LOGS=recompiles timeout 100 python3 -m composer.cli.launcher -n "$nproc" \
      --stdout "$OUT/logs/$name-out{rank}.txt" --stderr "$OUT/logs/$name-err{rank}.txt" \
      benchmarks/gpu_smoke.py "$recipe" "$OUT/results" "$@") > "$OUT/logs/$name.log" 2>&1
  fi
  rc=$?
  local recompiles
  recompiles=$(cat "$OUT/logs/$name"*.txt "$OUT/logs/$name.log" 2>/dev/null | grep -c "Recompiling function")
  note "smoke $name" "rc=$rc, recompiles=$recompiles" "$((SECONDS - start)) s"
}
run_smoke single 1 yamls/gpu/gpu-single.yaml
if [ "$GPUS" -ge 2 ]; then
  for r in growth lora context; do
    run_smoke "$r-ddp" 2 "yamls/gpu/gpu-$r.yaml"
    run_smoke "$r-fsdp2" 2 "yamls/gpu/gpu-$r.yaml" parallelism.fsdp.version=2
  done
else
  note "smoke two-GPU runs" "skipped: $GPUS GPU(s) here" "-"
fi
ls "$WORK"/runs/*/hf "$WORK"/runs/*/checkpoints/*/ > "$OUT/logs/exports.txt" 2>&1
cp -r "$WORK"/runs/*/summary.json "$OUT/results/" 2>/dev/null

# -- the table ---------------------------------------------------------------------------------------------
python3 - "$OUT/results" <<'PY'
import glob, json, os, sys
rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], "*-rank*.json")))]
print("\n| run | mode | rank | batches | s | loss | peak alloc GiB | peak reserved GiB | surgeries: batch (before -> during peak alloc GiB) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    mode = "fsdp2" if r["fsdp"] else ("ddp" if r["world_size"] > 1 else "single")
    surg = "; ".join(f'{s["batch"]} ({s["before"].get("peak_alloc_gib", 0):.2f} -> {s["during"].get("peak_alloc_gib", 0):.2f})'
                     for s in r["surgeries"])
    print(f'| {r["run"]} | {mode} | {r["rank"]} | {r["batches"]} | {r["seconds"]} | {r["loss"]:.3f} | '
          f'{r["peak_alloc_gib"]:.2f} | {r["peak_reserved_gib"]:.2f} | {surg} |')
PY
echo
printf '%s\n' "${status[@]}" | awk -F'|' '{printf "%-70s %-45s %s\n", $1, $2, $3}'
