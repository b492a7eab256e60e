// commvq's positional key scorer (methods/commvq.h, RoPE known): per query row and token,
// <q_r, RoPE_p(z_hat_t)> = <RoPE_{-p_b}(q_r), RoPE_t(z_hat_t)> with p = p_b + t, p_b a multiple
// of 64. Per block each row's query turns by -p_b w_i (double-precision angle, the cos / sin
// shared by the rows); per token the codeword sum z_hat_t is built and turned by the codec's
// table exp(j t w_i) once, then dotted with every row. The generic build is the reference;
// the AVX-512 build (core/cpu_isa.h; group_dim 8 and head dims that are multiples of 16, what
// calibration makes) builds and turns 16 coordinates (two groups) at a time in registers and
// sums the dot products in another order, so it rounds differently in the last bits.
#pragma once

#include <cstddef>
#include <cstdint>

namespace veloxquant {

class CommVQCodec;

/// For each row r < rows and token t < n: scores[r * score_stride + t] = <q_r, decode of
/// token t at position pos0 + t>, q_r at queries + r * query_stride, token t's code at
/// codes + t * codec.code_bytes(). The codec must be positional().
void commvq_rope_scores(const CommVQCodec& codec, const float* queries, std::size_t query_stride,
                        int rows, const uint8_t* codes, int n, int pos0, float* scores,
                        std::size_t score_stride);

}  // namespace veloxquant
