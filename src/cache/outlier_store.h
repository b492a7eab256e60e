// OutlierStore: the side store for tokens whose key norm the KeyNormObserver flags. Keys and
// values of such tokens are kept at outlier_bits (8: int8 with a per-vector absmax scale,
// 16: fp16) with their positions, per KV head; attention merges them into the same softmax.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace veloxquant {

class BinaryReader;
class BinaryWriter;

/// ||k|| of one key of d coordinates: squares summed in double in coordinate order, the root
/// rounded to float (the device's outlier flags compute it the same way: device_outliers.cu).
float key_norm(const float* key, int d);

class OutlierStore {
public:
    OutlierStore(int num_heads, int dim, int bits);

    int bits() const { return bits_; }
    int num_heads() const { return num_heads_; }
    int dim() const { return dim_; }
    /// Bytes of one stored vector (codes plus its scale for int8).
    std::size_t vector_bytes() const;

    /// Positions must be added in increasing order per head.
    void add(int head, int position, const float* key, const float* value);
    /// Drops entries at positions >= n_tokens.
    void truncate(int n_tokens);
    /// Drops entries at positions in [begin, end).
    void erase_range(int begin, int end);
    void clear();

    int count(int head) const { return static_cast<int>(positions_[head].size()); }
    int total() const;
    const std::vector<int32_t>& positions(int head) const { return positions_[head]; }
    bool contains(int head, int position) const;
    /// Index of the entry at `position`, or -1.
    int find(int head, int position) const;
    /// Head h's entries as stored: per entry its key vector, then its value vector, of
    /// vector_bytes() each (int8 codes then the float scale, or fp16).
    const std::vector<uint8_t>& records(int head) const { return records_[head]; }
    void key(int head, int index, float* out) const;
    void value(int head, int index, float* out) const;

    std::size_t nbytes() const;
    void write(BinaryWriter& out) const;
    /// Reads what write() wrote; throws std::runtime_error unless every position is below
    /// n_tokens and in increasing order per head and every stored vector is finite.
    void read(BinaryReader& in, int n_tokens);

private:
    void encode(const float* x, uint8_t* out) const;
    void decode(const uint8_t* in, float* out) const;

    int num_heads_;
    int dim_;
    int bits_;
    std::vector<std::vector<int32_t>> positions_;
    std::vector<std::vector<uint8_t>> records_;  ///< per entry: key vector, value vector
};

}  // namespace veloxquant
