#include "model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "model/dequant.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the GGUF reader assumes a little-endian host");

namespace veloxquant {
namespace {

constexpr uint64_t kMaxKeyLength = 65535;  // docs/gguf.md: keys are at most 65535 bytes
constexpr uint64_t kMaxTensorName = 64;    // docs/gguf.md: tensor names are at most 64 bytes
constexpr uint32_t kMaxDims = 4;
constexpr int kMaxArrayDepth = 4;  // arrays of arrays nest at most this deep
// Smallest possible encodings, used to reject counts that cannot fit in the file.
constexpr uint64_t kMinKVBytes = 8 + 4 + 1;                  // key length, value type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;  // name, n_dims, 1 dim, type, offset

[[noreturn]] void fail(const std::string& msg) {
    throw std::runtime_error("gguf: " + msg);
}

bool is_known_value_type(uint32_t t) {
    return t <= static_cast<uint32_t>(GGUFValueType::F64);
}

bool is_int_type(GGUFValueType t) {
    return gguf_value_type_size(t) != 0 && t != GGUFValueType::BOOL && t != GGUFValueType::F32 &&
           t != GGUFValueType::F64;
}

bool is_float_type(GGUFValueType t) {
    return t == GGUFValueType::F32 || t == GGUFValueType::F64;
}

template <typename T>
T load(const uint8_t* p) {
    T v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

int64_t decode_int(GGUFValueType t, const uint8_t* p, const std::string& key) {
    switch (t) {
        case GGUFValueType::U8:
            return load<uint8_t>(p);
        case GGUFValueType::I8:
            return load<int8_t>(p);
        case GGUFValueType::U16:
            return load<uint16_t>(p);
        case GGUFValueType::I16:
            return load<int16_t>(p);
        case GGUFValueType::U32:
            return load<uint32_t>(p);
        case GGUFValueType::I32:
            return load<int32_t>(p);
        case GGUFValueType::I64:
            return load<int64_t>(p);
        default: {  // U64, the only other integer type
            const auto v = load<uint64_t>(p);
            if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
                fail("key '" + key + "' value " + std::to_string(v) + " exceeds the int64 range");
            }
            return static_cast<int64_t>(v);
        }
    }
}

double decode_float(GGUFValueType t, const uint8_t* p) {
    return t == GGUFValueType::F32 ? static_cast<double>(load<float>(p)) : load<double>(p);
}

// Reads a validated string at p and advances p past it.
std::string decode_string(const uint8_t*& p) {
    const auto n = load<uint64_t>(p);
    std::string s(reinterpret_cast<const char*>(p + 8), static_cast<std::size_t>(n));
    p += 8 + n;
    return s;
}

std::string type_desc(GGUFValueType type, GGUFValueType elem) {
    std::string s = gguf_value_type_name(type);
    if (type == GGUFValueType::ARRAY) s += std::string(" of ") + gguf_value_type_name(elem);
    return s;
}

}  // namespace

std::size_t gguf_value_type_size(GGUFValueType t) {
    switch (t) {
        case GGUFValueType::U8:
        case GGUFValueType::I8:
        case GGUFValueType::BOOL:
            return 1;
        case GGUFValueType::U16:
        case GGUFValueType::I16:
            return 2;
        case GGUFValueType::U32:
        case GGUFValueType::I32:
        case GGUFValueType::F32:
            return 4;
        case GGUFValueType::U64:
        case GGUFValueType::I64:
        case GGUFValueType::F64:
            return 8;
        default:
            return 0;
    }
}

const char* ggml_type_name(GGMLType type) {
    switch (type) {
        case GGMLType::F32:
            return "F32";
        case GGMLType::F16:
            return "F16";
        case GGMLType::Q4_0:
            return "Q4_0";
        case GGMLType::Q4_1:
            return "Q4_1";
        case GGMLType::Q5_0:
            return "Q5_0";
        case GGMLType::Q5_1:
            return "Q5_1";
        case GGMLType::Q8_0:
            return "Q8_0";
        case GGMLType::Q8_1:
            return "Q8_1";
        case GGMLType::Q2_K:
            return "Q2_K";
        case GGMLType::Q3_K:
            return "Q3_K";
        case GGMLType::Q4_K:
            return "Q4_K";
        case GGMLType::Q5_K:
            return "Q5_K";
        case GGMLType::Q6_K:
            return "Q6_K";
        case GGMLType::Q8_K:
            return "Q8_K";
        case GGMLType::BF16:
            return "BF16";
    }
    return "unknown";
}

bool ggml_type_is_known(uint32_t id) {
    return std::strcmp(ggml_type_name(static_cast<GGMLType>(id)), "unknown") != 0;
}

const char* gguf_value_type_name(GGUFValueType type) {
    static const char* const kNames[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                         "bool", "string", "array", "u64", "i64", "f64"};
    const auto i = static_cast<uint32_t>(type);
    return is_known_value_type(i) ? kNames[i] : "unknown";
}

int64_t GGUFTensor::n_elements() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
}

// A bounds-checked cursor over the mapping that fills in a GGUFFile.
class GGUFFile::Parser {
public:
    explicit Parser(GGUFFile& f) : f_(f) {}

    void parse() {
        parse_header();
        f_.kvs_.reserve(static_cast<std::size_t>(kv_count_));
        for (uint64_t i = 0; i < kv_count_; ++i) parse_kv(i);
        parse_alignment();
        f_.tensors_.reserve(static_cast<std::size_t>(tensor_count_));
        for (uint64_t i = 0; i < tensor_count_; ++i) parse_tensor_info(i);
        const uint64_t a = f_.alignment_;
        f_.data_offset_ = (pos_ + a - 1) / a * a;
        for (GGUFTensor& t : f_.tensors_) locate(t);
    }

private:
    uint64_t remaining() const { return pos_ <= size() ? size() - pos_ : 0; }
    uint64_t size() const { return f_.size_; }

    // `where` and `what` name the field in the error message, which is only built on failure.
    void need(uint64_t n, const std::string& where, const char* what) const {
        if (n > remaining()) {
            fail("unexpected end of file reading " + where + what + " at offset " +
                 std::to_string(pos_) + " (need " + std::to_string(n) + " bytes, file size " +
                 std::to_string(size()) + ")");
        }
    }

    template <typename T>
    T read(const std::string& where, const char* what) {
        need(sizeof(T), where, what);
        const T v = load<T>(f_.base_ + pos_);
        pos_ += sizeof(T);
        return v;
    }

    // Validates a string (u64 length + bytes), moves past it and returns a pointer to its bytes.
    const uint8_t* read_string(const std::string& where, const char* what, uint64_t max_len,
                               uint64_t* len) {
        const uint64_t at = pos_;
        *len = read<uint64_t>(where, what);
        if (*len > max_len) {
            fail(where + what + " length " + std::to_string(*len) + " exceeds the limit " +
                 std::to_string(max_len));
        }
        if (*len > remaining()) {
            fail(where + what + " length " + std::to_string(*len) + " at offset " +
                 std::to_string(at) + " runs past end of file (size " + std::to_string(size()) +
                 ")");
        }
        const uint8_t* p = f_.base_ + pos_;
        pos_ += *len;
        return p;
    }

    void parse_header() {
        need(4, "", "magic");
        if (std::memcmp(f_.base_, "GGUF", 4) != 0) {
            char hex[16];
            std::snprintf(hex, sizeof hex, "%02x %02x %02x %02x", f_.base_[0], f_.base_[1],
                          f_.base_[2], f_.base_[3]);
            fail(std::string("bad magic ") + hex + " (expected \"GGUF\" = 47 47 55 46)");
        }
        pos_ = 4;
        f_.version_ = read<uint32_t>("", "version");
        const uint32_t v = f_.version_;
        if (v != 2 && v != 3) {
            const uint32_t swapped = __builtin_bswap32(v);
            if (swapped >= 1 && swapped <= 3) fail("big-endian files are not supported");
            fail("version " + std::to_string(v) + " is not supported (only 2 and 3)");
        }
        tensor_count_ = read<uint64_t>("", "tensor_count");
        kv_count_ = read<uint64_t>("", "metadata_kv_count");
        if (tensor_count_ > remaining() / kMinTensorInfoBytes) {
            fail("tensor_count " + std::to_string(tensor_count_) + " cannot fit in a file of " +
                 std::to_string(size()) + " bytes");
        }
        if (kv_count_ > remaining() / kMinKVBytes) {
            fail("metadata_kv_count " + std::to_string(kv_count_) + " cannot fit in a file of " +
                 std::to_string(size()) + " bytes");
        }
    }

    void parse_kv(uint64_t i) {
        uint64_t len;
        const uint8_t* p = read_string("key " + std::to_string(i), "", kMaxKeyLength, &len);
        KV kv;
        kv.key.assign(reinterpret_cast<const char*>(p), static_cast<std::size_t>(len));
        const std::string where = "key '" + kv.key + "'";
        const uint32_t t = read<uint32_t>(where, " value type");
        if (!is_known_value_type(t)) fail(where + " has unknown value type " + std::to_string(t));
        kv.type = static_cast<GGUFValueType>(t);
        kv.elem_type = kv.type;
        kv.count = 0;
        if (kv.type == GGUFValueType::ARRAY) {
            kv.elem_type = read_array_header(where, &kv.count);
            kv.payload = f_.base_ + pos_;
            skip_array_body(where, kv.elem_type, kv.count, 1);
        } else {
            kv.payload = f_.base_ + pos_;
            skip_value(where, kv.type, 0);
        }
        if (!f_.kv_index_.emplace(kv.key, f_.kvs_.size()).second) fail("duplicate " + where);
        f_.kvs_.push_back(std::move(kv));
    }

    GGUFValueType read_array_header(const std::string& where, uint64_t* count) {
        const uint32_t t = read<uint32_t>(where, " array element type");
        if (!is_known_value_type(t)) {
            fail(where + " has unknown array element type " + std::to_string(t));
        }
        *count = read<uint64_t>(where, " array length");
        return static_cast<GGUFValueType>(t);
    }

    // Validates one value of type t at pos_ and moves past it.
    void skip_value(const std::string& where, GGUFValueType t, int depth) {
        if (t == GGUFValueType::STRING) {
            uint64_t len;
            read_string(where, " string", std::numeric_limits<uint64_t>::max(), &len);
        } else if (t == GGUFValueType::ARRAY) {
            uint64_t count;
            const GGUFValueType elem = read_array_header(where, &count);
            skip_array_body(where, elem, count, depth + 1);
        } else {
            const std::size_t n = gguf_value_type_size(t);
            need(n, where, " value");
            if (t == GGUFValueType::BOOL && f_.base_[pos_] > 1) {
                fail(where + " bool value " + std::to_string(f_.base_[pos_]) + " is not 0 or 1");
            }
            pos_ += n;
        }
    }

    void skip_array_body(const std::string& where, GGUFValueType elem, uint64_t count, int depth) {
        if (depth > kMaxArrayDepth) {
            fail(where + " has arrays nested deeper than " + std::to_string(kMaxArrayDepth));
        }
        const std::size_t n = gguf_value_type_size(elem);
        // Every element takes at least one byte (8 for a string length, 12 for an array header).
        const uint64_t min_elem = n != 0 ? n : elem == GGUFValueType::STRING ? 8 : 12;
        if (count > remaining() / min_elem) {
            fail(where + " array length " + std::to_string(count) + " of " +
                 gguf_value_type_name(elem) + " runs past end of file (size " +
                 std::to_string(size()) + ")");
        }
        if (n != 0 && elem != GGUFValueType::BOOL) {
            pos_ += count * n;
            return;
        }
        for (uint64_t i = 0; i < count; ++i) skip_value(where, elem, depth);
    }

    void parse_alignment() {
        const auto it = f_.kv_index_.find("general.alignment");
        if (it == f_.kv_index_.end()) return;
        const KV& kv = f_.kvs_[it->second];
        if (kv.type != GGUFValueType::U32) {
            fail("general.alignment has type " + type_desc(kv.type, kv.elem_type) +
                 ", expected u32");
        }
        const auto a = load<uint32_t>(kv.payload);
        if (a < 8 || (a & (a - 1)) != 0) {
            fail("general.alignment " + std::to_string(a) + " is not a power of two >= 8");
        }
        f_.alignment_ = a;
    }

    void parse_tensor_info(uint64_t i) {
        GGUFTensor t;
        uint64_t len;
        const uint8_t* p =
            read_string("tensor " + std::to_string(i), " name", kMaxTensorName, &len);
        t.name.assign(reinterpret_cast<const char*>(p), static_cast<std::size_t>(len));
        const std::string where = "tensor '" + t.name + "'";
        const uint32_t n_dims = read<uint32_t>(where, " n_dims");
        if (n_dims < 1 || n_dims > kMaxDims) {
            fail(where + " n_dims " + std::to_string(n_dims) + " is out of range [1, " +
                 std::to_string(kMaxDims) + "]");
        }
        int64_t n_elements = 1;
        for (uint32_t d = 0; d < n_dims; ++d) {
            const std::string dim = where + " dims[" + std::to_string(d) + "]";
            const uint64_t v = read<uint64_t>(dim, "");
            if (v == 0 || v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
                fail(dim + " = " + std::to_string(v) + " is not in [1, INT64_MAX]");
            }
            const auto sv = static_cast<int64_t>(v);
            if (n_elements > std::numeric_limits<int64_t>::max() / sv) {
                fail(where + " element count overflows int64");
            }
            n_elements *= sv;
            t.dims.push_back(sv);
        }
        const uint32_t type = read<uint32_t>(where, " type");
        if (!ggml_type_is_known(type)) {
            fail(where + " has unknown ggml type id " + std::to_string(type));
        }
        t.type = static_cast<GGMLType>(type);
        const int block = ggml_block_size(t.type);
        if (t.dims[0] % block != 0) {
            fail(where + " dims[0] = " + std::to_string(t.dims[0]) + " is not a multiple of the " +
                 ggml_type_name(t.type) + " block size " + std::to_string(block));
        }
        const auto blocks = static_cast<uint64_t>(n_elements / block);
        if (blocks > std::numeric_limits<std::size_t>::max() / ggml_type_size(t.type)) {
            fail(where + " byte size overflows size_t");
        }
        t.nbytes = static_cast<std::size_t>(blocks) * ggml_type_size(t.type);
        t.offset = read<uint64_t>(where, " offset");
        if (t.offset % f_.alignment_ != 0) {
            fail(where + " offset " + std::to_string(t.offset) + " is not a multiple of the " +
                 "alignment " + std::to_string(f_.alignment_));
        }
        t.data = nullptr;
        if (!f_.tensor_index_.emplace(t.name, f_.tensors_.size()).second) {
            fail("duplicate tensor name '" + t.name + "'");
        }
        f_.tensors_.push_back(std::move(t));
    }

    // Checks that the tensor's bytes lie inside the file and points t.data at them. Tensors may
    // overlap (the format does not forbid it).
    void locate(GGUFTensor& t) const {
        const std::string where = "tensor '" + t.name + "'";
        if (t.offset > size()) {
            fail(where + " offset " + std::to_string(t.offset) + " runs past end of file (size " +
                 std::to_string(size()) + ")");
        }
        const uint64_t begin = f_.data_offset_ + t.offset;
        if (begin > size() || t.nbytes > size() - begin) {
            fail(where + " data [" + std::to_string(begin) + ", " +
                 std::to_string(begin + t.nbytes) + ") runs past end of file (size " +
                 std::to_string(size()) + ")");
        }
        t.data = f_.base_ + begin;
    }

    GGUFFile& f_;
    uint64_t pos_ = 0;
    uint64_t tensor_count_ = 0;
    uint64_t kv_count_ = 0;
};

std::unique_ptr<GGUFFile> GGUFFile::open(const std::string& path) {
    std::unique_ptr<GGUFFile> f(new GGUFFile());
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail("cannot open " + path + ": " + std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(path + " is not a readable regular file");
    }
    f->size_ = static_cast<std::size_t>(st.st_size);
    if (f->size_ > 0) {
        f->map_ = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (f->map_ == MAP_FAILED) {
            f->map_ = nullptr;
            const std::string err = std::strerror(errno);
            ::close(fd);
            fail("cannot mmap " + path + ": " + err);
        }
        f->base_ = static_cast<const uint8_t*>(f->map_);
    }
    ::close(fd);
    try {
        Parser(*f).parse();
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(std::string(e.what()) + " [" + path + "]");
    }
    return f;
}

GGUFFile::~GGUFFile() {
    if (map_ != nullptr) ::munmap(map_, size_);
}

std::vector<std::string> GGUFFile::keys() const {
    std::vector<std::string> out;
    out.reserve(kvs_.size());
    for (const KV& kv : kvs_) out.push_back(kv.key);
    return out;
}

bool GGUFFile::has(const std::string& key) const {
    return kv_index_.count(key) != 0;
}

const GGUFFile::KV& GGUFFile::lookup(const std::string& key) const {
    const auto it = kv_index_.find(key);
    if (it == kv_index_.end()) fail("key '" + key + "' not found");
    return kvs_[it->second];
}

const GGUFFile::KV& GGUFFile::lookup_array(const std::string& key, const char* wanted) const {
    const KV& kv = lookup(key);
    if (kv.type != GGUFValueType::ARRAY) {
        fail("key '" + key + "' has type " + gguf_value_type_name(kv.type) + ", expected " +
             wanted);
    }
    return kv;
}

GGUFValueType GGUFFile::value_type(const std::string& key) const {
    return lookup(key).type;
}

GGUFValueType GGUFFile::array_type(const std::string& key) const {
    return lookup_array(key, "an array").elem_type;
}

int64_t GGUFFile::get_int(const std::string& key) const {
    const KV& kv = lookup(key);
    if (!is_int_type(kv.type)) {
        fail("key '" + key + "' has type " + type_desc(kv.type, kv.elem_type) +
             ", expected an integer");
    }
    return decode_int(kv.type, kv.payload, key);
}

int64_t GGUFFile::get_int(const std::string& key, int64_t fallback) const {
    return has(key) ? get_int(key) : fallback;
}

double GGUFFile::get_float(const std::string& key) const {
    const KV& kv = lookup(key);
    if (!is_float_type(kv.type)) {
        fail("key '" + key + "' has type " + type_desc(kv.type, kv.elem_type) +
             ", expected f32 or f64");
    }
    return decode_float(kv.type, kv.payload);
}

double GGUFFile::get_float(const std::string& key, double fallback) const {
    return has(key) ? get_float(key) : fallback;
}

bool GGUFFile::get_bool(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    const KV& kv = lookup(key);
    if (kv.type != GGUFValueType::BOOL) {
        fail("key '" + key + "' has type " + type_desc(kv.type, kv.elem_type) + ", expected bool");
    }
    return kv.payload[0] != 0;
}

std::string GGUFFile::get_string(const std::string& key) const {
    const KV& kv = lookup(key);
    if (kv.type != GGUFValueType::STRING) {
        fail("key '" + key + "' has type " + type_desc(kv.type, kv.elem_type) +
             ", expected string");
    }
    const uint8_t* p = kv.payload;
    return decode_string(p);
}

std::vector<std::string> GGUFFile::get_string_array(const std::string& key) const {
    const KV& kv = lookup_array(key, "array of string");
    if (kv.elem_type != GGUFValueType::STRING) {
        fail("key '" + key + "' has type " + type_desc(kv.type, kv.elem_type) +
             ", expected array of string");
    }
    std::vector<std::string> out;
    out.reserve(static_cast<std::size_t>(kv.count));
    const uint8_t* p = kv.payload;
    for (uint64_t i = 0; i < kv.count; ++i) out.push_back(decode_string(p));
    return out;
}

std::vector<int64_t> GGUFFile::get_int_array(const std::string& key) const {
    const KV& kv = lookup_array(key, "array of integers");
    if (!is_int_type(kv.elem_type)) {
        fail("key '" + key + "' has type " + type_desc(kv.type, kv.elem_type) +
             ", expected array of integers");
    }
    const std::size_t n = gguf_value_type_size(kv.elem_type);
    std::vector<int64_t> out(static_cast<std::size_t>(kv.count));
    for (std::size_t i = 0; i < out.size(); ++i) {
        out[i] = decode_int(kv.elem_type, kv.payload + i * n, key);
    }
    return out;
}

std::vector<double> GGUFFile::get_float_array(const std::string& key) const {
    const KV& kv = lookup_array(key, "array of f32 or f64");
    if (!is_float_type(kv.elem_type)) {
        fail("key '" + key + "' has type " + type_desc(kv.type, kv.elem_type) +
             ", expected array of f32 or f64");
    }
    const std::size_t n = gguf_value_type_size(kv.elem_type);
    std::vector<double> out(static_cast<std::size_t>(kv.count));
    for (std::size_t i = 0; i < out.size(); ++i) {
        out[i] = decode_float(kv.elem_type, kv.payload + i * n);
    }
    return out;
}

const GGUFTensor* GGUFFile::find_tensor(const std::string& name) const {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

std::map<std::string, int> GGUFFile::type_histogram() const {
    std::map<std::string, int> h;
    for (const GGUFTensor& t : tensors_) ++h[ggml_type_name(t.type)];
    return h;
}

}  // namespace veloxquant
