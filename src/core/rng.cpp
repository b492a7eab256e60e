#include "core/rng.h"

#include <cmath>

namespace veloxquant {
namespace {

uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

}  // namespace

uint64_t derive_seed(uint64_t seed, int layer, int head, int dim, RandomPurpose purpose) {
    uint64_t state = seed;
    uint64_t h = splitmix64(state);
    const uint64_t parts[4] = {static_cast<uint64_t>(static_cast<uint32_t>(layer)),
                               static_cast<uint64_t>(static_cast<uint32_t>(head)),
                               static_cast<uint64_t>(static_cast<uint32_t>(dim)),
                               static_cast<uint64_t>(purpose)};
    for (uint64_t p : parts) {
        state = h ^ (p * 0xD6E8FEB86659FD93ull);
        h = splitmix64(state);
    }
    return h;
}

Rng::Rng(uint64_t seed) {
    uint64_t state = seed;
    for (auto& s : s_) s = splitmix64(state);
}

uint64_t Rng::next_u64() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
}

double Rng::uniform() {
    return static_cast<double>(next_u64() >> 11) * 0x1.0p-53;
}

double Rng::normal() {
    if (has_spare_) {
        has_spare_ = false;
        return spare_;
    }
    double u1 = 0.0;
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 6.283185307179586476925 * u2;
    spare_ = r * std::sin(theta);
    has_spare_ = true;
    return r * std::cos(theta);
}

uint64_t Rng::below(uint64_t n) {
    // Lemire's multiply-shift with rejection: unbiased.
    uint64_t x = next_u64();
    __uint128_t m = static_cast<__uint128_t>(x) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
        const uint64_t threshold = (0 - n) % n;
        while (low < threshold) {
            x = next_u64();
            m = static_cast<__uint128_t>(x) * n;
            low = static_cast<uint64_t>(m);
        }
    }
    return static_cast<uint64_t>(m >> 64);
}

}  // namespace veloxquant
