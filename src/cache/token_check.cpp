#include "cache/token_check.h"

#include <cmath>
#include <string>

#include "core/half.h"

namespace veloxquant {

std::size_t first_bad_coordinate(const float* x, std::size_t count, float bound) {
    // Blocks of 64 tested without an exit in the loop (the compiler vectorises the AND), then
    // the first bad coordinate looked up one by one from the first block that has one.
    constexpr std::size_t kBlock = 64;
    std::size_t i = 0;
    for (; i + kBlock <= count; i += kBlock) {
        int bad = 0;
        for (std::size_t k = 0; k < kBlock; ++k) bad |= !(std::fabs(x[i + k]) < bound);
        if (bad) break;
    }
    for (; i < count; ++i)
        if (!(std::fabs(x[i]) < bound)) return i;  // NaN compares false
    return count;
}

std::invalid_argument bad_token_error(bool keys, float value, std::size_t index, int n_tokens,
                                      int head_dim, int heads_per_sequence) {
    const std::size_t per_head = static_cast<std::size_t>(n_tokens) * head_dim;
    const std::size_t head = index / per_head;
    const std::string sequence =
        heads_per_sequence > 0 ? "sequence " + std::to_string(head / heads_per_sequence) + ", "
                               : "";
    const std::size_t head_in_sequence = heads_per_sequence > 0 ? head % heads_per_sequence : head;
    const std::string where = " (" + sequence + "head " + std::to_string(head_in_sequence) +
                              ", token " + std::to_string(index % per_head / head_dim) + ")";
    const std::string what = keys ? "keys" : "values";
    if (!std::isfinite(value))
        return std::invalid_argument("append: " + what + " contain NaN or Inf" + where);
    return std::invalid_argument("append: " + what + " exceed fp16's range, |x| < " +
                                 std::to_string(static_cast<int>(kHalfOverflow)) + where +
                                 ": got " + std::to_string(value) + ", and this config stores " +
                                 what + " as fp16");
}

}  // namespace veloxquant
