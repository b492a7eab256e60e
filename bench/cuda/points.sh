#!/usr/bin/env bash
# Times decode points one process each, so that no point's clock or L2 state follows another's:
#   bash bench/cuda/points.sh OUT_PREFIX   (run from a build folder; ab_h200.sh's AB_BENCH)
# $PTS lists the points (default below), each METHOD:D:B:N as bench_cuda_attention takes it, with
# @b:c to force head splits of b pages and tail splits of c (VQ_SPLIT_PAGES, VQ_TAIL_PAGES) and
# %k to chain k decodes a graph (VQ_CHAIN) and a final ~ to launch them on the stream instead of
# as graphs (VQ_GRAPH=0). Each point's JSON goes to OUT_PREFIX_<point>.json; the console gets the
# point and its timing line.
set -uo pipefail
out=${1:?usage: points.sh OUT_PREFIX}
default="k1v2:64:8:131072 k1v2:64:32:131072 k1v2:64:1:131072 k1v2:128:8:131072"
default+=" k1v2:128:32:131072 k2x2v4:128:8:131072 k4v4:64:8:131072"
for p in ${PTS:-$default}; do
  settings=() q=$p
  [ "${q%\~}" != "$q" ] && q=${q%\~} && settings+=("VQ_GRAPH=0")
  r=$q q=${r%\%*}
  [ "$q" != "$r" ] && settings+=("VQ_CHAIN=${r#*%}")
  pt=${q%@*}
  if [ "$pt" != "$q" ]; then
    s=${q#*@}
    settings+=("VQ_SPLIT_PAGES=${s%:*}" "VQ_TAIL_PAGES=${s#*:}")
  fi
  name=${p//[:@%~]/_}
  echo "$p $(env "${settings[@]}" ./bench/cuda/bench_cuda_attention "${out}_$name.json" "$pt" 2>&1 |
    grep 'B=')"
done
