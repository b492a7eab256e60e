// The inner loop of the key scorers that look up one 256-entry float table per code byte
// (turboquant_rvq and ratequant at 1, 2, 4 or 8 bits, qjl, rabitq): per token, the sum over
// its code bytes of table[byte position][byte value]. A single running sum (qjl, rabitq) waits
// on each add's latency, so its AVX2 and AVX-512 builds (core/cpu_isa.h) sum 8 or 16 tokens at
// once, one per lane, with gathers, in the scalar loop's order: every set gives the same bits.
#pragma once

#include <cstddef>
#include <cstdint>

namespace veloxquant {

/// sums[t] = sum over b < bytes of tables[b * 256 + codes[t * stride + b]] for t < n. With
/// chains = 4, bytes 4i..4i+3 go to four running sums s0..s3 (the last bytes % 4 bytes to s0)
/// and sums[t] = (s0 + s1) + (s2 + s3); with chains = 1 one running sum takes the bytes in
/// order. Throws std::invalid_argument for any other chains.
void byte_table_sums(const float* tables, const uint8_t* codes, std::size_t stride,
                     std::size_t bytes, int n, int chains, float* sums);

}  // namespace veloxquant
