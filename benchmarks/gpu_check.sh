#!/usr/bin/env bash
# The GPU measurement of the speed targets (one H100 or H200, bf16): prints the benchmarks' JSON lines, one per run.
#   bash benchmarks/gpu_check.sh
# 1. one MoE MLP layer at ViT-B shape (d=768, 16 experts, top-4) on 128 x 197 = 25,216 tokens against the dense MLP
#    of equal active width (`best_vs_dense`, target <= 1.3), then a ViT-B train step against transformers'
#    ViTForImageClassification at batch 128, 224 px (`vit_b_train_vs_dense`, target >= 0.75), with both models'
#    forward FLOPs per image;
# 2. the same for ViT-S at batch 256 (`vit_s_train_vs_dense`, target >= 0.6).
# The GPU machine reaches no package registry: moe_adapt comes with the working tree (PYTHONPATH); a dependency its
# python3 lacks (the first command lists them) travels as wheels in .whl/ (see the device tool's README).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib.util, sys, torch
missing = [m for m in ("transformers", "peft", "accelerate", "safetensors", "yaml", "scipy", "PIL", "tqdm")
           if importlib.util.find_spec(m) is None]
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, device "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else None}; missing: {missing}", file=sys.stderr)
sys.exit(1 if missing or not torch.cuda.is_available() else 0)
PY
python3 benchmarks/moe_layer.py --preset vit-b --batch 128 --device cuda --dtype bfloat16 \
  --backends segmented_mm,grouped_mm --rounds 10 --model-rounds 5
python3 benchmarks/moe_layer.py --preset vit-s --batch 256 --device cuda --dtype bfloat16 \
  --backends segmented_mm,grouped_mm --rounds 10 --model-rounds 5
