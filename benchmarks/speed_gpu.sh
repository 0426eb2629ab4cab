#!/usr/bin/env bash
# The speed measurements of docs/benchmarks.md that need a GPU, in parts of under ten minutes each on an H100
# (one device call each): plans (a plan's fixed cost, reuse and level sharing at 1024/2048 px, windowed
# matching, the automatic floor at 512/1024 px), sdxl (beyond the top level, with the MLP merged too), families
# (every family at its native size), compiled (torch.compile'd steps, unpatched and patched), floor (SDXL with
# the defaults, the automatic floor deciding).
# Usage: benchmarks/speed_gpu.sh OUT_DIR PART [BASELINE_SRC]   (BASELINE_SRC: an older tree's src/, for plan_cost.py)
# BENCH_ARGS is appended to every bench line (BENCH_ARGS="--tiny --device cpu" checks the lines on CPU).
set -u
out=${1:?usage: speed_gpu.sh OUT_DIR plans|sdxl|families|compiled|floor [BASELINE_SRC]}; part=${2:?part}; base=${3:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
bench() { name=$1; shift; python3 -m tokenmerge.tools.cli bench --dtype float16 --repeats 5 --warmup 2 --out "$out/$name" "$@" ${BENCH_ARGS:-} \
    2>&1 | grep -v -e "round .* done" | tee "$out/$name.log"; }

case $part in
plans)
    python3 benchmarks/plan_cost.py --device cuda --tokens 256,1024,4096,16384 --repeats 50 ${base:+--baseline "$base"} \
        | tee "$out/plan_cost.md"
    bench sd15-reuse --models sd15 --sizes 1024,2048 --ratios 0.5,0.75 --methods unpatched,tomesd,tome,importance \
        --share-plan block,level --steps 3 --plan-every 3
    bench sd15-window --models sd15 --sizes 1024,2048 --ratios 0.5,0.75 --methods unpatched,tome --match-window 1 \
        --share-plan block,level
    bench sd15-floor --models sd15 --sizes 512,1024 --ratios 0.5,0.75 --methods unpatched,tomesd,tome,importance ;;
sdxl)
    bench sdxl --models sdxl --sizes 2048 --ratios 0.5,0.75 --methods unpatched,tome,importance --max-downsample 2 \
        --min-tokens 0 --share-plan level --steps 3 --plan-every 3
    bench sdxl-mlp --models sdxl --sizes 2048 --ratios 0.5,0.75 --methods unpatched,tome,importance --max-downsample 2 \
        --min-tokens 0 --share-plan level --steps 3 --plan-every 3 --merge-mlp ;;
families)
    bench families --models sd21,pixart,dit,lcm,animatediff,zero123pp --ratios 0.5 \
        --methods unpatched,tomesd,tome,importance ;;
compiled)
    bench sd15-compiled --models sd15 --sizes 512,1024 --ratios 0.5 --methods unpatched,tome,importance \
        --share-plan level --min-tokens 0 --compile reduce-overhead ;;
floor)
    bench sdxl-floor --models sdxl --sizes 1024,2048 --ratios 0.5,0.75 --methods unpatched,tome,importance ;;
*) echo "unknown part $part" >&2; exit 2 ;;
esac
