// Builds GGUF v3 files in memory: metadata in insertion order, then tensor infos, then the data
// section with every tensor padded to the alignment. Used by tests and tools to make small
// synthetic models; tensors may be given as raw (already quantized) ggml blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

#include "model/gguf.h"

namespace veloxquant {

class GGUFWriter {
public:
    // Scalar metadata. Each key may be added once (std::invalid_argument otherwise). The data
    // alignment is taken from a "general.alignment" u32, if added (a power of two >= 8; default
    // 32).
    void add_u8(const std::string& key, uint8_t v);
    void add_i8(const std::string& key, int8_t v);
    void add_u16(const std::string& key, uint16_t v);
    void add_i16(const std::string& key, int16_t v);
    void add_u32(const std::string& key, uint32_t v);
    void add_i32(const std::string& key, int32_t v);
    void add_u64(const std::string& key, uint64_t v);
    void add_i64(const std::string& key, int64_t v);
    void add_f32(const std::string& key, float v);
    void add_f64(const std::string& key, double v);
    void add_bool(const std::string& key, bool v);
    void add_string(const std::string& key, const std::string& v);

    // Array metadata.
    void add_string_array(const std::string& key, const std::vector<std::string>& v);
    void add_i32_array(const std::string& key, const std::vector<int32_t>& v);
    void add_f32_array(const std::string& key, const std::vector<float>& v);
    /// An array of any fixed-size element type (not string/array): `count` little-endian values
    /// of that type at `data`.
    void add_array(const std::string& key, GGUFValueType elem_type, uint64_t count,
                   const void* data);

    /// Adds a tensor of shape `dims` (dims[0] innermost, 1 to 4 dims, all > 0) whose raw bytes
    /// (ggml blocks for quantized types) are `data`; nbytes must match the shape and type.
    /// Throws std::invalid_argument on a duplicate or overlong name, a bad shape or size.
    void add_tensor(const std::string& name, const std::vector<int64_t>& dims, GGMLType type,
                    const void* data, std::size_t nbytes);
    void add_tensor(const std::string& name, const std::vector<int64_t>& dims, GGMLType type,
                    const std::vector<uint8_t>& bytes) {
        add_tensor(name, dims, type, bytes.data(), bytes.size());
    }
    /// An F32 tensor.
    void add_tensor(const std::string& name, const std::vector<int64_t>& dims,
                    const std::vector<float>& values) {
        add_tensor(name, dims, GGMLType::F32, values.data(), values.size() * sizeof(float));
    }

    /// The complete file contents.
    std::string to_bytes() const;
    /// Writes to_bytes() to path atomically; throws std::runtime_error on I/O failure.
    void write(const std::string& path) const;

private:
    struct Tensor {
        std::string name;
        std::vector<int64_t> dims;
        GGMLType type;
        std::string data;
    };

    // Starts a key/value record: key string and value type.
    void begin_kv(const std::string& key, GGUFValueType type);

    std::string kv_;  // encoded key/value records
    uint64_t kv_count_ = 0;
    std::unordered_set<std::string> keys_;
    uint32_t alignment_ = 32;
    std::vector<Tensor> tensors_;
    std::unordered_set<std::string> tensor_names_;
};

}  // namespace veloxquant
