#!/usr/bin/env bash
# The GPU benchmark: jdistill against PyTorch (eager and torch.compile) on one NVIDIA GPU.
#
#   bench/download_wheels.sh          # here, with network: fills wheels/
#   bench/gpu.sh                      # on the GPU machine, from the repo root, wheels/ carried along
#
# Measures, bf16 compute over fp32 params, the train step (denoising loss, AdamW, clipping)
# of DiT-XL/2 at 256 px (MFU, samples/s) and of SD1.5's UNet (64x64 latents, 77 tokens),
# each against the same diffusers module with the same weights, eager and under
# torch.compile; and checks that the cuDNN attention jdistill picks on the GPU agrees with
# XLA's. Needs no network; the carried wheels go to a private folder (.bench_site), and only
# for modules that do not import already.
#
# Writes to $OUT (default ./out): table.md (every model so far), <model>.json / .md / .log,
# env.txt, attention.txt, gpu.log. Each model has its own time limit and the table is
# rewritten after each one, so a model that fails or runs out of time leaves the others'
# rows. About 8 minutes at most.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
log() { echo "[gpu.sh $(date +%T)] $*" | tee -a "$LOG"; }
PY=python3

SITE="$PWD/.bench_site"
mkdir -p "$SITE"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
install_if_missing() {  # module, wheel glob
  if ! $PY -c "import $1" 2>/dev/null; then
    for w in wheels/$2; do
      [ -e "$w" ] || continue
      if $PY -m pip install --quiet --no-deps --no-index --target "$SITE" "$w" 2>>"$LOG"; then break; fi
    done
  fi
}
install_if_missing filelock "filelock-*.whl"
install_if_missing PIL "pillow-*.whl"
install_if_missing diffusers "diffusers-*.whl"
TORCH=eager,compile
if ! $PY -c "import diffusers" 2>>"$LOG"; then
  log "diffusers does not import (see gpu.log): timing jdistill alone"
  TORCH=none
fi

timeout 60 $PY -c "
import jax, torch
print('jax', jax.__version__, jax.devices())
print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))
" > "$OUT/env.txt" 2>&1 || log "environment report failed"
tee -a "$LOG" < "$OUT/env.txt"

# the attention kernel jdistill picks here, against XLA's and the einsum path, in bf16 at
# DiT-XL/2's and SD1.5's shapes (tests/test_attention.py checks the same where pytest is)
timeout 90 $PY -m jdistill.bench.attention_check > "$OUT/attention.txt" 2>&1 \
  || log "attention check failed or timed out: see attention.txt"
tee -a "$LOG" < "$OUT/attention.txt"

run_model() {  # name, seconds
  local name=$1 budget=$2
  log "$name: up to ${budget}s"
  timeout --kill-after=15 "$budget" $PY -m jdistill.bench --preset gpu --models "$name" --tasks train \
      --torch "$TORCH" --rounds 5 --model-timeout $((budget - 20)) --json "$OUT/$name.json" \
      > "$OUT/$name.md" 2> "$OUT/$name.log" || log "$name: exit $? (see $name.log)"
  if ls "$OUT"/*.json > /dev/null 2>&1; then
    $PY -m jdistill.bench.report "$OUT"/*.json > "$OUT/table.md" 2>> "$LOG" || true
  fi
}
run_model dit-xl2 210
run_model sd15-unet 170

log "done"
if [ -s "$OUT/table.md" ]; then tee -a "$LOG" < "$OUT/table.md"; else log "no table: every model failed"; fi
