#!/usr/bin/env bash
# Weight-only int8 against float32 on a trained checkpoint: greedy predictions of the same sentences, chrF of each.
#
#   benchmarks/int8_quality.sh CHECKPOINT SRC REFS OUT [MODES]
#
# e.g. the offline study's checkpoint on its 500 dev sentences ($RUNS: recipes/offline-study/Makefile's RUNS):
#   benchmarks/int8_quality.sh $RUNS/final/llm2slm-d2-ce-std-26k-k6/train/final \
#       $RUNS/data/dev500.en $RUNS/data/dev500.de runs/int8-quality
# MODES (default "none int8-weight"): the --quantize modes to decode with, each to OUT/pred-MODE and OUT/eval-MODE,
# the decoding the study's predictions use (recipes/offline-study/Makefile: --num-beams 1 --max-new-tokens 128).
# Eager decoding: --compile gives the same tokens (tests/test_quantize.py), only faster.
set -euo pipefail
ckpt=$1 src=$2 refs=$3 out=$4
modes=${5:-"none int8-weight"}
llm2slm=${LLM2SLM:-llm2slm}
mkdir -p "$out"
for mode in $modes; do
  "$llm2slm" generate "$src" "$refs" --model "$ckpt" --num-beams 1 --max-new-tokens 128 --quantize "$mode" \
    --out "$out/pred-$mode" --overwrite --quiet
  "$llm2slm" eval "$out/pred-$mode" --metrics chrf --out "$out/eval-$mode" --overwrite --quiet
  python -c 'import json, sys; m = json.load(open(sys.argv[1])); print(sys.argv[2], "chrF", m["metrics"]["chrf"]["score"])' \
    "$out/eval-$mode/metrics.json" "$mode"
done
