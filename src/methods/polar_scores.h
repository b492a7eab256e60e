// The inner loop of polarquant's key scorer (methods/polarquant.h): per query row and token,
// <q, decode(token)> from the codes. The generic build is the reference, the bottom-up collapse
// of each 16-coordinate block token by token. The AVX-512 build (core/cpu_isa.h) scores 16
// tokens at once, one per lane: a token's block is radius * product of the cos / sin of its
// level-2..4 angles along each path down the tree times the level-1 pair's collapse, so the
// eight path weights per block are worked out once for every row and each row adds eight
// vpermps lookups of its level-1 tables times them. It rounds differently from the reference
// (in the last bits), not between rows or calls.
#pragma once

#include <cstddef>
#include <cstdint>

namespace veloxquant {

class PolarQuantCodec;

/// For each row r < rows and token t < n: scores[r * score_stride + t] = <q_r, decode(t)>,
/// q_r's query state (PolarQuantCodec::prepare_query) at states + r * state_stride, token t's
/// code at codes + t * codec.code_bytes() and its norm at norms[t].
void polar_scores(const PolarQuantCodec& codec, const float* states, std::size_t state_stride,
                  int rows, const uint8_t* codes, const float* norms, int n, float* scores,
                  std::size_t score_stride);

}  // namespace veloxquant
