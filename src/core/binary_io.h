// Little-endian binary serialization with bounds-checked reads, a CRC-32 over the payload, and
// atomic file writes (temporary file in the same directory, fsync, rename).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace veloxquant {

uint32_t crc32(const void* data, std::size_t n, uint32_t crc = 0);

class BinaryWriter {
public:
    template <typename T>
    void put(const T& v) {
        static_assert(std::is_trivially_copyable<T>::value, "put() takes plain values");
        bytes(&v, sizeof v);
    }
    void bytes(const void* p, std::size_t n) {
        const auto* c = static_cast<const char*>(p);
        buf_.append(c, n);
    }
    void str(const std::string& s) {
        put<uint64_t>(s.size());
        bytes(s.data(), s.size());
    }
    template <typename T>
    void vec(const std::vector<T>& v) {
        put<uint64_t>(v.size());
        bytes(v.data(), v.size() * sizeof(T));
    }
    const std::string& buffer() const { return buf_; }

private:
    std::string buf_;
};

/// Reads from a buffer; every read past the end throws std::runtime_error("truncated ...").
class BinaryReader {
public:
    BinaryReader(const char* data, std::size_t n) : p_(data), end_(data + n) {}
    template <typename T>
    T get() {
        T v;
        bytes(&v, sizeof v);
        return v;
    }
    void bytes(void* out, std::size_t n) {
        if (static_cast<std::size_t>(end_ - p_) < n)
            throw std::runtime_error("truncated cache file");
        std::memcpy(out, p_, n);
        p_ += n;
    }
    std::string str(std::size_t max_len = 1 << 20) {
        const auto n = get<uint64_t>();
        if (n > max_len || n > remaining())
            throw std::runtime_error("corrupted cache file: bad string length");
        std::string s(p_, p_ + n);
        p_ += n;
        return s;
    }
    template <typename T>
    std::vector<T> vec(std::size_t max_elems) {
        const auto n = get<uint64_t>();
        if (n > max_elems || n * sizeof(T) > remaining())
            throw std::runtime_error("corrupted cache file: bad array length");
        std::vector<T> v(n);
        if (n > 0) bytes(v.data(), n * sizeof(T));  // (an empty vector's data() may be null)
        return v;
    }
    std::size_t remaining() const { return static_cast<std::size_t>(end_ - p_); }

private:
    const char* p_;
    const char* end_;
};

/// Writes `contents` to path atomically; throws std::runtime_error on any I/O failure.
void write_file_atomic(const std::string& path, const std::string& contents);
/// Reads a whole file; throws std::runtime_error if it cannot.
std::string read_file(const std::string& path);

}  // namespace veloxquant
