#!/usr/bin/env bash
# Runs the CPU attention benchmark (median of repeats) and writes its JSON plus a Markdown
# summary with each method's ratio to dense float32 attention measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
mkdir -p bench/results
stamp=$(date -u +%Y%m%d)
out=bench/results/cpu_attention_${stamp}.json
./build/bench/bench_attention --benchmark_repetitions=5 --benchmark_report_aggregates_only=true \
  --benchmark_out="$out" --benchmark_out_format=json "$@"
.venv/bin/python bench/summarize_cpu_bench.py "$out" "bench/results/cpu_attention_${stamp}.md" \
  "OMP_NUM_THREADS=${OMP_NUM_THREADS:-<all cores>} bash bench/run_cpu_bench.sh $*"
