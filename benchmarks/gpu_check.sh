#!/usr/bin/env bash
# The speed benchmarks and a 2-iteration self-play run on CUDA, in under 10 minutes on one GPU (A100/H100/H200).
#
#   bash benchmarks/gpu_check.sh          # on a GPU machine: CUDA, paper-like sampling (50 DDIM steps, CFG 7.5)
#   bash benchmarks/gpu_check.sh --cpu    # the same steps, shrunk, on the CPU (checks this script; ~5 min)
#
# Environment: PYTHON (default: python), OUT (default: /tmp/spin_gpu_check; the run dirs and logs go there).
# Every step has its own time limit; the script stops at the first failure. Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/spin_gpu_check}
export HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--cpu" ]]; then
  DEVICE=cpu; BATCH=4; STEPS=4; PROMPTS=32; REPEATS=1; ITERS_PROMPTS=32; TRAIN_STEPS=4; EVAL=8; ITER_STEPS=8
  export CUDA_VISIBLE_DEVICES=""
else
  DEVICE=cuda; BATCH=32; STEPS=50; PROMPTS=512; REPEATS=3; ITERS_PROMPTS=256; TRAIN_STEPS=8; EVAL=64; ITER_STEPS=50
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device; use --cpu')"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi
MIXED=(); [[ $DEVICE == cuda ]] && MIXED=(--set train.mixed_precision=bf16)
rm -rf "$OUT" && mkdir -p "$OUT"
step() { local limit=$1; shift; echo; echo "=== [$limit s] $*"; timeout "$limit" "$@"; }

# 1. Core loops (training step of each objective, sampling) on the demo model: ~1 min on a GPU
step 90 "$PY" benchmarks/bench_core.py --device "$DEVICE" --batch "$BATCH" --steps "$STEPS" --repeats "$REPEATS" \
  2>&1 | tee "$OUT/bench_core.txt"

# 2. Side by side on the SD-like model (FLOP ratios, generation vs diffusers pipeline, sampling options,
#    SPIN vs Diffusion-DPO-structured step, whole-iteration split): ~4 min on a GPU
step 300 "$PY" benchmarks/bench_iteration.py --device "$DEVICE" --batch "$BATCH" --steps "$STEPS" \
  --repeats "$REPEATS" --iteration-prompts "$ITERS_PROMPTS" 2>&1 | tee "$OUT/bench_iteration.txt"

# 3. A 2-iteration self-play run on the demo model and shapes world (sample.dtype=auto: bf16 generation on CUDA),
#    with training visiting half of the prompts (max_steps x batch = prompts / 2: partial generation)
step 150 "$PY" -m spin_diffusion.cli spin --config configs/tiny.yaml --run-dir "$OUT/run" \
  --set model.preset=demo --set num_iterations=2 --set data.num_builtin="$PROMPTS" \
  --set sample.num_steps="$ITER_STEPS" --set sample.guidance_scale=7.5 --set sample.batch_size="$BATCH" \
  --set sample.shard_size=64 --set train.batch_size="$BATCH" --set train.max_steps="$TRAIN_STEPS" \
  "${MIXED[@]}" \
  --set eval.num_prompts="$EVAL" 2>&1 | tail -n 20 | tee "$OUT/run.txt"
"$PY" - "$OUT/run" <<'PYEOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
state = json.loads((run / "state.json").read_text())
assert state["completed"][-1] == "eval:2", state["completed"]
for k in (0, 1):
    meta = json.loads((run / f"iter_{k:02d}" / "generated" / "meta.json").read_text())
    n, total = meta["num_generated"], meta["spec"]["num_prompts"]
    assert n == total // 2, f"expected half of the {total} prompts generated (train.max_steps x batch), got {n}"
    print(f"iteration {k}: generated {n} of {total} prompts ({meta['spec']['dtype']}, {meta['spec']['scheduler']}); "
          f"train {state['info'][f'train:{k + 1}']['wall_seconds']} s; metrics {state['info'].get(f'eval:{k + 1}')}")
PYEOF

# 4. The same run shape with DPM-Solver++ at half the steps (spin_approx): it must complete
step 90 "$PY" -m spin_diffusion.cli spin --config configs/tiny.yaml --run-dir "$OUT/run_dpm" \
  --set model.preset=demo --set num_iterations=1 --set data.num_builtin="$PROMPTS" \
  --set sample.num_steps=$((ITER_STEPS / 2)) --set sample.scheduler=dpmsolver++ --set sample.guidance_scale=7.5 \
  --set sample.batch_size="$BATCH" --set train.batch_size="$BATCH" --set train.max_steps="$TRAIN_STEPS" \
  --set eval.num_prompts="$EVAL" 2>&1 | tail -n 5 | tee "$OUT/run_dpm.txt"

# 5. Every transformer/UNet family (tiny presets): spin_exact with bf16 mixed precision, export, plain-diffusers
#    reload and generation (the newest families' CUDA paths: Z-Image's lists, Qwen-Image's VAE, FLUX.2's latents)
for preset in tiny-sdxl tiny-sd3 tiny-flux tiny-zimage tiny-qwenimage tiny-flux2; do
  extra=()
  [[ $preset == tiny-flux ]] && extra=(--set sample.guidance_scale=3.5 --set model.max_sequence_length=32)
  [[ $preset == tiny-qwenimage ]] && extra=(--set model.max_sequence_length=192)
  step 120 "$PY" -m spin_diffusion.cli spin --config configs/tiny.yaml --run-dir "$OUT/run_$preset" \
    --set model.preset="$preset" --set loss.objective=spin_exact "${MIXED[@]}" "${extra[@]}" 2>&1 | tail -n 3
  "$PY" - "$OUT/run_$preset/iter_02/model" "$DEVICE" <<'PYEOF'
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True).to(sys.argv[2])
name = type(pipe).__name__
kw = {"max_sequence_length": 77} if name == "StableDiffusion3Pipeline" else {}
if name in ("FluxPipeline", "ZImagePipeline", "QwenImagePipeline", "Flux2KleinPipeline"):  # their default is 1024 px
    kw |= {"height": 16, "width": 16}
kw |= {"FluxPipeline": {"max_sequence_length": 32}, "QwenImagePipeline": {"max_sequence_length": 192}}.get(name, {})
image = pipe(prompt="a red circle", num_inference_steps=4, output_type="np", **kw).images[0]
assert image.shape == (16, 16, 3) and image.std() > 0, image.shape
print(f"{name}: exported, reloaded and generated on {sys.argv[2]}")
PYEOF
done
echo; echo "gpu_check: all steps passed; logs in $OUT"
