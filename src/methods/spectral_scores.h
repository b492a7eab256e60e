// spectral's query state and key scorer (methods/spectral.h): <q, k_hat> = <q, mu> +
// s sum_r (U q)_r sigma_r C_{b_r}[i_r], one table lookup per group of coded coordinates
// (SpectralCodec::Group). The generic builds are the reference. The AVX-512 builds
// (core/cpu_isa.h) build the state in float (the reference sums in double; the tables agree to
// about 1e-6 relative) and score 16 tokens at once, one per lane: each group's field taken out
// of the codes once for up to four rows, a 16-entry table looked up with one vpermps (a wider
// slot's with a gather), added in the reference's order, so that scoring gives the same bits
// on every set.
#pragma once

#include <cstddef>
#include <cstdint>

namespace veloxquant {

class SpectralCodec;

/// Writes codec.query_state_size() floats of query's state (SpectralCodec::prepare_query).
void spectral_query_state(const SpectralCodec& codec, const float* query, float* state);

/// For each row r < rows and token t < n: scores[r * score_stride + t] = <q_r, decode(t)>,
/// q_r's state at states + r * state_stride, token t's code at codes + t * codec.code_bytes()
/// and its scale at scalars[t]. Per token, one running sum over the groups in order, then
/// <q, mu> + s * sum, the product rounded on its own.
void spectral_scores(const SpectralCodec& codec, const float* states, std::size_t state_stride,
                     int rows, const uint8_t* codes, const float* scalars, int n, float* scores,
                     std::size_t score_stride);

/// spectral_scores' generic build, whichever set is in use.
void spectral_scores_reference(const SpectralCodec& codec, const float* states,
                               std::size_t state_stride, int rows, const uint8_t* codes,
                               const float* scalars, int n, float* scores,
                               std::size_t score_stride);

}  // namespace veloxquant
