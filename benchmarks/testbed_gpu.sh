#!/usr/bin/env bash
# Train the testbed generator, pick its sampler, and evaluate every method on it, on one GPU (the figures in
# docs/testbed.md and docs/quality.md came from this script on an H100).
# Usage: benchmarks/testbed_gpu.sh OUT_DIR [TRAIN_MINUTES] [INIT_PIPELINE_DIR] [SPLITS]
set -u
out=${1:?usage: testbed_gpu.sh OUT_DIR [TRAIN_MINUTES] [INIT_PIPELINE_DIR] [SPLITS]}
minutes=${2:-6.5}; init=${3:-}; splits=${4:-heldout}
mkdir -p "$out"; work=$(mktemp -d)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout $(( ${minutes%.*} * 60 + 150 )) python3 -m tokenmerge.testbed.train --out "$work/testbed" --steps 200000 \
    --minutes "$minutes" --batch 256 --lr 3e-4 --samples 100000 --workers 16 --checkpoint-every 2000 --seed 0 \
    ${init:+--init "$init"} 2>&1 | grep -v -e "Writing model shards" | tee "$out/train.log"
python3 benchmarks/testbed_samplers.py "$work/testbed" --count 500 --save-best 2>&1 | grep -v Loading | tee "$out/samplers.log"
tar -C "$work" -cf "$out/testbed.tar" testbed
methods="tome,importance,importance[dst_selection=topk]:0.7,importance[independent_from=all]:0.7,retom,sito,tofu"
for split in $splits; do
    python3 -m tokenmerge.tools.cli eval --model "$work/testbed" --methods "$methods" --ratios 0.5,0.6,0.7,0.75 \
        --split "$split" --count 500 --batch 250 --out "$work/eval-$split" --device cuda --no-progress \
        2>&1 | grep -v -e "Loading" | tee "$out/eval-$split.log"
    tar -C "$work" -cf "$out/eval-$split.tar" "eval-$split"
done
