#include "model/gguf_writer.h"

#include <cstring>
#include <stdexcept>

#include "core/binary_io.h"
#include "model/dequant.h"

namespace veloxquant {
namespace {

constexpr uint32_t kVersion = 3;
constexpr std::size_t kMaxTensorName = 64;
constexpr std::size_t kMaxKeyLength = 65535;

template <typename T>
void put(std::string& out, const T& v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof v);
}

void put_string(std::string& out, const std::string& s) {
    put<uint64_t>(out, s.size());
    out.append(s);
}

void pad_to(std::string& out, std::size_t alignment) {
    out.append((alignment - out.size() % alignment) % alignment, '\0');
}

}  // namespace

void GGUFWriter::begin_kv(const std::string& key, GGUFValueType type) {
    if (key.empty() || key.size() > kMaxKeyLength) {
        throw std::invalid_argument("GGUFWriter: key length " + std::to_string(key.size()) +
                                    " is not in [1, 65535]");
    }
    if (key == "general.alignment" && type != GGUFValueType::U32) {
        throw std::invalid_argument("GGUFWriter: general.alignment must be a u32");
    }
    if (!keys_.insert(key).second) {
        throw std::invalid_argument("GGUFWriter: duplicate key '" + key + "'");
    }
    put_string(kv_, key);
    put<uint32_t>(kv_, static_cast<uint32_t>(type));
    ++kv_count_;
}

void GGUFWriter::add_u8(const std::string& key, uint8_t v) {
    begin_kv(key, GGUFValueType::U8);
    put(kv_, v);
}

void GGUFWriter::add_i8(const std::string& key, int8_t v) {
    begin_kv(key, GGUFValueType::I8);
    put(kv_, v);
}

void GGUFWriter::add_u16(const std::string& key, uint16_t v) {
    begin_kv(key, GGUFValueType::U16);
    put(kv_, v);
}

void GGUFWriter::add_i16(const std::string& key, int16_t v) {
    begin_kv(key, GGUFValueType::I16);
    put(kv_, v);
}

void GGUFWriter::add_u32(const std::string& key, uint32_t v) {
    if (key == "general.alignment" && (v < 8 || (v & (v - 1)) != 0)) {
        throw std::invalid_argument("GGUFWriter: general.alignment " + std::to_string(v) +
                                    " is not a power of two >= 8");
    }
    begin_kv(key, GGUFValueType::U32);
    put(kv_, v);
    if (key == "general.alignment") alignment_ = v;
}

void GGUFWriter::add_i32(const std::string& key, int32_t v) {
    begin_kv(key, GGUFValueType::I32);
    put(kv_, v);
}

void GGUFWriter::add_u64(const std::string& key, uint64_t v) {
    begin_kv(key, GGUFValueType::U64);
    put(kv_, v);
}

void GGUFWriter::add_i64(const std::string& key, int64_t v) {
    begin_kv(key, GGUFValueType::I64);
    put(kv_, v);
}

void GGUFWriter::add_f32(const std::string& key, float v) {
    begin_kv(key, GGUFValueType::F32);
    put(kv_, v);
}

void GGUFWriter::add_f64(const std::string& key, double v) {
    begin_kv(key, GGUFValueType::F64);
    put(kv_, v);
}

void GGUFWriter::add_bool(const std::string& key, bool v) {
    begin_kv(key, GGUFValueType::BOOL);
    put<uint8_t>(kv_, v ? 1 : 0);
}

void GGUFWriter::add_string(const std::string& key, const std::string& v) {
    begin_kv(key, GGUFValueType::STRING);
    put_string(kv_, v);
}

void GGUFWriter::add_string_array(const std::string& key, const std::vector<std::string>& v) {
    begin_kv(key, GGUFValueType::ARRAY);
    put<uint32_t>(kv_, static_cast<uint32_t>(GGUFValueType::STRING));
    put<uint64_t>(kv_, v.size());
    for (const std::string& s : v) put_string(kv_, s);
}

void GGUFWriter::add_i32_array(const std::string& key, const std::vector<int32_t>& v) {
    add_array(key, GGUFValueType::I32, v.size(), v.data());
}

void GGUFWriter::add_f32_array(const std::string& key, const std::vector<float>& v) {
    add_array(key, GGUFValueType::F32, v.size(), v.data());
}

void GGUFWriter::add_array(const std::string& key, GGUFValueType elem_type, uint64_t count,
                           const void* data) {
    const std::size_t n = gguf_value_type_size(elem_type);
    if (n == 0) {
        throw std::invalid_argument(std::string("GGUFWriter: add_array takes fixed-size ") +
                                    "elements, not " + gguf_value_type_name(elem_type));
    }
    if (elem_type == GGUFValueType::BOOL) {
        const auto* b = static_cast<const uint8_t*>(data);
        for (uint64_t i = 0; i < count; ++i) {
            if (b[i] > 1) throw std::invalid_argument("GGUFWriter: bool array value not 0 or 1");
        }
    }
    begin_kv(key, GGUFValueType::ARRAY);
    put<uint32_t>(kv_, static_cast<uint32_t>(elem_type));
    put<uint64_t>(kv_, count);
    if (count > 0) kv_.append(static_cast<const char*>(data), static_cast<std::size_t>(count) * n);
}

void GGUFWriter::add_tensor(const std::string& name, const std::vector<int64_t>& dims,
                            GGMLType type, const void* data, std::size_t nbytes) {
    const std::string where = "GGUFWriter: tensor '" + name + "'";
    if (name.size() > kMaxTensorName) {
        throw std::invalid_argument(where + " name is longer than 64 bytes");
    }
    if (dims.empty() || dims.size() > 4) {
        throw std::invalid_argument(where + " must have 1 to 4 dims");
    }
    for (int64_t d : dims) {
        if (d <= 0) throw std::invalid_argument(where + " has a non-positive dim");
    }
    std::size_t expected = ggml_row_bytes(type, dims[0]);
    bool overflow = false;
    for (std::size_t i = 1; i < dims.size(); ++i) {
        overflow |= __builtin_mul_overflow(expected, static_cast<std::size_t>(dims[i]), &expected);
    }
    if (overflow) throw std::invalid_argument(where + " byte size overflows size_t");
    if (nbytes != expected) {
        throw std::invalid_argument(where + " has " + std::to_string(nbytes) + " bytes, expected " +
                                    std::to_string(expected));
    }
    if (!tensor_names_.insert(name).second) {
        throw std::invalid_argument("GGUFWriter: duplicate tensor name '" + name + "'");
    }
    tensors_.push_back({name, dims, type, std::string(static_cast<const char*>(data), nbytes)});
}

std::string GGUFWriter::to_bytes() const {
    std::string out = "GGUF";
    put<uint32_t>(out, kVersion);
    put<uint64_t>(out, tensors_.size());
    put<uint64_t>(out, kv_count_);
    out += kv_;
    // Tensor infos: offsets are relative to the data section, each tensor starting aligned.
    uint64_t offset = 0;
    for (const Tensor& t : tensors_) {
        put_string(out, t.name);
        put<uint32_t>(out, static_cast<uint32_t>(t.dims.size()));
        for (int64_t d : t.dims) put<uint64_t>(out, static_cast<uint64_t>(d));
        put<uint32_t>(out, static_cast<uint32_t>(t.type));
        put<uint64_t>(out, offset);
        offset += (t.data.size() + alignment_ - 1) / alignment_ * alignment_;
    }
    pad_to(out, alignment_);
    for (const Tensor& t : tensors_) {
        out += t.data;
        pad_to(out, alignment_);
    }
    return out;
}

void GGUFWriter::write(const std::string& path) const {
    write_file_atomic(path, to_bytes());
}

}  // namespace veloxquant
