#!/usr/bin/env bash
# The main job on the embedded mini benchmark, end to end on a CPU (what `make demo` runs):
#   1. build the mini benchmark (Fashion-MNIST classification, MNIST-digit detection, Fashion-MNIST segmentation)
#   2. pretrain one multi-task MoE ViT on all three at once, with the MI loss      -> metrics + expert heatmap
#   3. extract a standalone sub-model per task, verified against the full model   -> model card + report
#      (and the smallest fashion slice: k experts per layer)
#   4. LoRA-fine-tune a new downstream set (scikit-learn digits) on its slice      -> efficiency report
#   5. add that set as a new task by growing the model; old tasks stay bit-identical
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
start=$(date +%s)
step() { printf '\n=== [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

step "1/5 mini benchmark -> data/mini"
if [ -f data/mini/specs.yaml ]; then echo "data/mini exists (delete it to rebuild)"; else "$BIN/moe-adapt" data mini --out data/mini; fi

step "2/5 multi-task pretraining (recipes/configs/mini.yaml)"
"$BIN/moe-adapt" pretrain --config recipes/configs/mini.yaml --output-dir "$OUT/pretrain"

step "3/5 extract one sub-model per task"
for task in fashion digits-det fashion-seg; do
  "$BIN/moe-adapt" extract "$OUT/pretrain/model" --data data/mini --task "$task" --max-images 128 \
    --verify-images 128 --out "$OUT/extract/$task" --overwrite
done
# the smallest fashion slice: k experts per layer, every MoE layer one fused dense layer
"$BIN/moe-adapt" extract "$OUT/pretrain/model" --data data/mini --task fashion --policy top_n \
  --max-images 128 --verify-images 128 --out "$OUT/extract/fashion-top_n" --overwrite

step "4/5 LoRA fine-tune of scikit-learn digits on its slice"
"$BIN/moe-adapt" finetune --config recipes/configs/finetune_digits.yaml --model "$OUT/pretrain/model" \
  --output-dir "$OUT/finetune_digits"

step "5/5 continual learning: add 'digits' as a new task"
"$BIN/moe-adapt" continual --config recipes/configs/continual.yaml --model "$OUT/pretrain/model" \
  "output_dir=$OUT/continual_digits" train.max_steps=300

step "done: everything is under $OUT"
