#include "cache/outlier_store.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "core/binary_io.h"
#include "core/half.h"

namespace veloxquant {

float key_norm(const float* key, int d) {
    double s = 0.0;
    for (int j = 0; j < d; ++j) s += static_cast<double>(key[j]) * key[j];
    return static_cast<float>(std::sqrt(s));
}

OutlierStore::OutlierStore(int num_heads, int dim, int bits)
    : num_heads_(num_heads), dim_(dim), bits_(bits), positions_(num_heads), records_(num_heads) {
    if (bits != 8 && bits != 16)
        throw std::invalid_argument("outlier_bits must be 8 (int8) or 16 (fp16), got " +
                                    std::to_string(bits));
}

std::size_t OutlierStore::vector_bytes() const {
    return bits_ == 16 ? 2u * dim_ : static_cast<std::size_t>(dim_) + sizeof(float);
}

void OutlierStore::encode(const float* x, uint8_t* out) const {
    if (bits_ == 16) {
        uint16_t* h = reinterpret_cast<uint16_t*>(out);
        for (int j = 0; j < dim_; ++j) h[j] = float_to_half(x[j]);
        return;
    }
    float amax = 0.0f;
    for (int j = 0; j < dim_; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float scale = amax / 127.0f;
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    int8_t* q = reinterpret_cast<int8_t*>(out);
    for (int j = 0; j < dim_; ++j)
        q[j] = static_cast<int8_t>(std::lrint(std::clamp(x[j] * inv, -127.0f, 127.0f)));
    std::memcpy(out + dim_, &scale, sizeof scale);
}

void OutlierStore::decode(const uint8_t* in, float* out) const {
    if (bits_ == 16) {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(in);
        for (int j = 0; j < dim_; ++j) out[j] = half_to_float(h[j]);
        return;
    }
    float scale;
    std::memcpy(&scale, in + dim_, sizeof scale);
    const int8_t* q = reinterpret_cast<const int8_t*>(in);
    for (int j = 0; j < dim_; ++j) out[j] = scale * q[j];
}

void OutlierStore::add(int head, int position, const float* key, const float* value) {
    const std::size_t vb = vector_bytes();
    std::vector<uint8_t>& rec = records_[head];
    const std::size_t at = rec.size();
    rec.resize(at + 2 * vb);
    try {
        positions_[head].push_back(position);
    } catch (...) {
        rec.resize(at);  // a record for every position, even when the position could not be kept
        throw;
    }
    encode(key, rec.data() + at);
    encode(value, rec.data() + at + vb);
}

void OutlierStore::truncate(int n_tokens) {
    erase_range(n_tokens, INT32_MAX);
}

void OutlierStore::erase_range(int begin, int end) {
    const std::size_t rb = 2 * vector_bytes();
    for (int h = 0; h < num_heads_; ++h) {
        auto& pos = positions_[h];
        const auto lo = std::lower_bound(pos.begin(), pos.end(), begin) - pos.begin();
        const auto hi = std::lower_bound(pos.begin(), pos.end(), end) - pos.begin();
        if (lo == hi) continue;
        pos.erase(pos.begin() + lo, pos.begin() + hi);
        auto& rec = records_[h];
        rec.erase(rec.begin() + lo * rb, rec.begin() + hi * rb);
        rec.shrink_to_fit();
        pos.shrink_to_fit();
    }
}

void OutlierStore::clear() {
    for (int h = 0; h < num_heads_; ++h) {
        positions_[h] = {};
        records_[h] = {};
    }
}

int OutlierStore::total() const {
    int n = 0;
    for (const auto& p : positions_) n += static_cast<int>(p.size());
    return n;
}

int OutlierStore::find(int head, int position) const {
    const auto& pos = positions_[head];
    const auto it = std::lower_bound(pos.begin(), pos.end(), position);
    return (it != pos.end() && *it == position) ? static_cast<int>(it - pos.begin()) : -1;
}

bool OutlierStore::contains(int head, int position) const {
    return find(head, position) >= 0;
}

void OutlierStore::key(int head, int index, float* out) const {
    decode(records_[head].data() + static_cast<std::size_t>(index) * 2 * vector_bytes(), out);
}

void OutlierStore::value(int head, int index, float* out) const {
    const std::size_t vb = vector_bytes();
    decode(records_[head].data() + static_cast<std::size_t>(index) * 2 * vb + vb, out);
}

std::size_t OutlierStore::nbytes() const {
    std::size_t n = 0;
    for (int h = 0; h < num_heads_; ++h)
        n += positions_[h].capacity() * sizeof(int32_t) + records_[h].capacity();
    return n;
}

void OutlierStore::write(BinaryWriter& out) const {
    for (int h = 0; h < num_heads_; ++h) {
        out.vec(positions_[h]);
        out.vec(records_[h]);
    }
}

void OutlierStore::read(BinaryReader& in, int n_tokens) {
    const std::size_t vb = vector_bytes(), rb = 2 * vb;
    for (int h = 0; h < num_heads_; ++h) {
        auto pos = in.vec<int32_t>(1u << 30);
        auto rec = in.vec<uint8_t>(std::size_t{1} << 40);
        if (rec.size() != pos.size() * rb)
            throw std::runtime_error("corrupted cache file: outlier store sizes disagree");
        for (std::size_t i = 0; i < pos.size(); ++i)
            if (pos[i] < 0 || pos[i] >= n_tokens || (i > 0 && pos[i] <= pos[i - 1]))
                throw std::runtime_error(
                    "corrupted cache file: outlier positions not increasing within the tokens");
        for (std::size_t v = 0; v < 2 * pos.size(); ++v) {
            const uint8_t* x = rec.data() + v * vb;
            float scale = 0.0f;
            if (bits_ == 8) std::memcpy(&scale, x + dim_, sizeof scale);
            if (bits_ == 16 ? !halves_finite(x, dim_) : !std::isfinite(scale))
                throw std::runtime_error("corrupted cache file: a non-finite outlier vector");
        }
        positions_[h] = std::move(pos);
        records_[h] = std::move(rec);
    }
}

}  // namespace veloxquant
