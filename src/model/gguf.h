// Read-only, validating GGUF (v2/v3) reader over a memory-mapped file.
//
// Layout (ggml docs/gguf.md): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, the
// key/value metadata, the tensor infos, padding to the alignment, then the data section. All
// integers are little-endian; strings are a u64 length followed by UTF-8 bytes. open() checks
// every length, count and offset against the file before anything is used, so a malformed file
// raises std::runtime_error naming the offending field instead of reading out of bounds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace veloxquant {

/// ggml tensor type ids as stored in GGUF tensor infos.
enum class GGMLType : uint32_t {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    BF16 = 30,
};

/// "Q4_1" etc.; "unknown" for an id outside the enum.
const char* ggml_type_name(GGMLType type);
/// Whether `id` is one of the GGMLType enumerators.
bool ggml_type_is_known(uint32_t id);

/// Metadata value types (gguf_metadata_value_type).
enum class GGUFValueType : uint32_t {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    BOOL = 7,
    STRING = 8,
    ARRAY = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
};

/// "u32", "string", "array" etc.; "unknown" outside the enum.
const char* gguf_value_type_name(GGUFValueType type);
/// Byte size of a fixed-size value type; 0 for string and array.
std::size_t gguf_value_type_size(GGUFValueType type);

struct GGUFTensor {
    std::string name;
    std::vector<int64_t> dims;  // dims[0] is the innermost (contiguous) dimension: the columns
    GGMLType type;
    uint64_t offset;      // as stored: relative to the start of the data section
    std::size_t nbytes;   // n_elements / block_size * type_size
    const uint8_t* data;  // into the mapping; valid while the GGUFFile lives

    int64_t n_elements() const;
    int64_t rows() const { return n_elements() / dims[0]; }
    int64_t cols() const { return dims[0]; }
};

class GGUFFile {
public:
    /// Maps and validates `path`; throws std::runtime_error on any I/O error or malformation.
    static std::unique_ptr<GGUFFile> open(const std::string& path);
    ~GGUFFile();
    GGUFFile(const GGUFFile&) = delete;
    GGUFFile& operator=(const GGUFFile&) = delete;

    uint32_t version() const { return version_; }
    uint32_t alignment() const { return alignment_; }
    uint64_t data_offset() const { return data_offset_; }  // absolute start of the data section
    std::size_t file_size() const { return size_; }

    /// Metadata keys in file order.
    std::vector<std::string> keys() const;
    bool has(const std::string& key) const;
    /// Type of a value, and for arrays the element type; throw if the key is missing.
    GGUFValueType value_type(const std::string& key) const;
    GGUFValueType array_type(const std::string& key) const;

    // Getters throw std::runtime_error naming the key and its actual type when the key is missing
    // or holds another type. Integer getters accept every integer type (a u64 above INT64_MAX
    // throws); float getters accept f32 and f64. The fallback overloads return the fallback only
    // when the key is absent; a present key of the wrong type still throws.
    int64_t get_int(const std::string& key) const;
    int64_t get_int(const std::string& key, int64_t fallback) const;
    double get_float(const std::string& key) const;
    double get_float(const std::string& key, double fallback) const;
    bool get_bool(const std::string& key, bool fallback) const;
    std::string get_string(const std::string& key) const;
    std::vector<std::string> get_string_array(const std::string& key) const;
    std::vector<int64_t> get_int_array(const std::string& key) const;
    std::vector<double> get_float_array(const std::string& key) const;

    const std::vector<GGUFTensor>& tensors() const { return tensors_; }
    /// nullptr if absent.
    const GGUFTensor* find_tensor(const std::string& name) const;
    /// Tensor count per type name, e.g. {"F32": 61, "Q4_1": 210, "Q8_0": 1}.
    std::map<std::string, int> type_histogram() const;

private:
    // A validated metadata value: `payload` points into the mapping at the encoded value
    // (for arrays, at the first element, after the element type and count).
    struct KV {
        std::string key;
        GGUFValueType type;
        GGUFValueType elem_type;  // arrays only
        uint64_t count;           // arrays only
        const uint8_t* payload;
    };
    class Parser;

    GGUFFile() = default;
    const KV& lookup(const std::string& key) const;
    const KV& lookup_array(const std::string& key, const char* wanted) const;

    void* map_ = nullptr;
    const uint8_t* base_ = nullptr;
    std::size_t size_ = 0;
    uint32_t version_ = 0;
    uint32_t alignment_ = 32;
    uint64_t data_offset_ = 0;
    std::vector<KV> kvs_;
    std::unordered_map<std::string, std::size_t> kv_index_;
    std::vector<GGUFTensor> tensors_;
    std::unordered_map<std::string, std::size_t> tensor_index_;
};

}  // namespace veloxquant
