// The input check every cache runs before an append changes anything: keys and values must be
// finite and under the config's bounds (KVCacheConfig::key_bound / value_bound: fp16 storage
// turns magnitudes of 65520 and more into infinity). Shared by the CPU caches and, for the
// error text, by the device caches (src/cuda/input_check.h), so both say the same.
#pragma once

#include <cstddef>
#include <stdexcept>

namespace veloxquant {

/// Index of the first of x[0 .. count) that is NaN, infinite, or not under `bound` in
/// magnitude; count if none is.
std::size_t first_bad_coordinate(const float* x, std::size_t count, float bound);

/// The append error for coordinate `index` of keys (or values), laid out
/// [heads][n_tokens][head_dim], whose value is `value`: "append: keys contain NaN or Inf
/// (head h, token t)", or for a finite value over the bound, that it exceeds fp16's range.
/// With heads_per_sequence > 0 the heads are [sequence][heads_per_sequence] (a batch of
/// sequences) and the error names "sequence s, head h, token t".
std::invalid_argument bad_token_error(bool keys, float value, std::size_t index, int n_tokens,
                                      int head_dim, int heads_per_sequence = 0);

}  // namespace veloxquant
