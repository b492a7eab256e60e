// Seeded random numbers that are identical across runs and machines: SplitMix64 for seed
// derivation, xoshiro256** for streams, Box-Muller in double precision for normals.
#pragma once

#include <cstdint>

namespace veloxquant {

/// What a random object is for; part of its derived seed so objects never share streams.
enum class RandomPurpose : uint64_t {
    kKeyRotation = 1,
    kValueRotation = 2,
    kSketch = 3,
    kKMeans = 4,
    kResidualFit = 5,
    kTest = 99,
};

/// Mixes (seed, layer, head, dim, purpose) into one 64-bit seed.
uint64_t derive_seed(uint64_t seed, int layer, int head, int dim, RandomPurpose purpose);

class Rng {
public:
    explicit Rng(uint64_t seed);
    uint64_t next_u64();
    /// Uniform in [0, 1) with 53 random bits.
    double uniform();
    /// Standard normal (Box-Muller; the second value of each pair is kept for the next call).
    double normal();
    /// Uniform integer in [0, n).
    uint64_t below(uint64_t n);

private:
    uint64_t s_[4];
    bool has_spare_ = false;
    double spare_ = 0.0;
};

}  // namespace veloxquant
