// The inner loop of a key scorer on 16-entry float tables, one per 4-bit half of a code byte:
// per query row and token, the sum over the token's code nibbles of table[nibble position]
// [nibble value]. The AVX-512 build scores 16 tokens at once, one per lane, each table lookup
// one vpermps, the nibbles taken out of the codes once for all rows; the AVX2 build scores 8,
// each lookup two vpermps (the table's halves) and a blend. Every build adds in the scalar
// loop's order, so all sets give the same bits.
#pragma once

#include <cstddef>
#include <cstdint>

namespace veloxquant {

/// For each row r < rows and token t < n: sums[r * sum_stride + t] = the sum over nibbles
/// p < 2 bytes of tables[r * table_stride + p * 16 + nibble p of codes + t * stride], nibble 2b
/// being the low half of byte b. Nibble p goes to running sum s[p % 4]; the sum is
/// (s0 + s1) + (s2 + s3).
void nibble_table_sums(const float* tables, std::size_t table_stride, int rows,
                       const uint8_t* codes, std::size_t stride, std::size_t bytes, int n,
                       float* sums, std::size_t sum_stride);

/// Whether nibble_table_sums has a SIMD build on the set in use (core/cpu_isa.h); without one,
/// one 256-entry table per byte (byte_table_sums) takes half the lookups. On AVX2 the nibble
/// build's scorer alone ties the byte tables' gathers, but its tables (16 entries, not 256) take
/// a query's preparation and cache less: turboquant_rvq decodes 8-13% faster with them.
bool nibble_tables_are_faster();

}  // namespace veloxquant
