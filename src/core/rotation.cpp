#include "core/rotation.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/cpu_isa.h"
#include "core/rng.h"
#include "core/x86_intrinsics.h"

namespace veloxquant {

bool is_power_of_two(int d) {
    return d > 0 && (d & (d - 1)) == 0;
}

namespace {

void fwht_generic(float* x, int n) {
    for (int len = 1; len < n; len <<= 1) {
        for (int i = 0; i < n; i += len << 1) {
            for (int j = i; j < i + len; ++j) {
                const float a = x[j];
                const float b = x[j + len];
                x[j] = a + b;
                x[j + len] = a - b;
            }
        }
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(n));
    for (int i = 0; i < n; ++i) x[i] *= scale;
}

#ifdef VQ_X86_KERNELS
// The same butterflies for n >= 8, each output one add or subtract of the same two floats:
// lengths 1, 2 and 4 inside each register of 8 (v + its partner where the pair's first element
// sits, partner - v at the second: a + b and a - b), longer ones between registers, then the
// scale. Bit for bit fwht_generic.
__attribute__((target("avx2"))) void fwht_avx2(float* x, int n) {
    const __m256i swap1 = _mm256_setr_epi32(1, 0, 3, 2, 5, 4, 7, 6);
    const __m256i swap2 = _mm256_setr_epi32(2, 3, 0, 1, 6, 7, 4, 5);
    for (int i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 p = _mm256_permutevar8x32_ps(v, swap1);
        v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xAA);
        p = _mm256_permutevar8x32_ps(v, swap2);
        v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xCC);
        p = _mm256_permute2f128_ps(v, v, 0x01);
        v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xF0);
        _mm256_storeu_ps(x + i, v);
    }
    for (int len = 8; len < n; len <<= 1)
        for (int i = 0; i < n; i += len << 1)
            for (int j = i; j < i + len; j += 8) {
                const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + len);
                _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
                _mm256_storeu_ps(x + j + len, _mm256_sub_ps(a, b));
            }
    const __m256 scale = _mm256_set1_ps(1.0f / std::sqrt(static_cast<float>(n)));
    for (int i = 0; i < n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), scale));
}
#endif

}  // namespace

void fwht_orthonormal(float* x, int n) {
#ifdef VQ_X86_KERNELS
    if (n >= 8) return kernel_for_isa(fwht_generic, fwht_avx2, fwht_avx2)(x, n);
#endif
    fwht_generic(x, n);
}

Rotation::Rotation(int d, bool use_hadamard, uint64_t seed) : d_(d) {
    if (d < 1 || d > kMaxDim)
        throw std::invalid_argument("rotation dimension must be in 1.." + std::to_string(kMaxDim) +
                                    ", got " + std::to_string(d));
    Rng rng(seed);
    hadamard_ = use_hadamard && is_power_of_two(d);
    if (hadamard_) {
        signs_.resize(d);
        for (int i = 0; i < d; ++i) signs_[i] = (rng.next_u64() >> 63) ? -1.0f : 1.0f;
        return;
    }
    // Haar-random orthogonal matrix: Gram-Schmidt (twice, for stability) on Gaussian rows,
    // which equals QR with the sign convention diag(R) > 0.
    std::vector<double> a(static_cast<std::size_t>(d) * d);
    for (auto& v : a) v = rng.normal();
    for (int i = 0; i < d; ++i) {
        double* row = &a[static_cast<std::size_t>(i) * d];
        for (int pass = 0; pass < 2; ++pass) {
            for (int j = 0; j < i; ++j) {
                const double* prev = &a[static_cast<std::size_t>(j) * d];
                double dot = 0.0;
                for (int k = 0; k < d; ++k) dot += row[k] * prev[k];
                for (int k = 0; k < d; ++k) row[k] -= dot * prev[k];
            }
        }
        double norm = 0.0;
        for (int k = 0; k < d; ++k) norm += row[k] * row[k];
        norm = std::sqrt(norm);
        for (int k = 0; k < d; ++k) row[k] /= norm;
    }
    matrix_.assign(a.begin(), a.end());
}

void Rotation::forward(const float* x, float* y) const {
    if (hadamard_) {
        for (int i = 0; i < d_; ++i) y[i] = x[i] * signs_[i];
        fwht_orthonormal(y, d_);
        return;
    }
    float tmp[kMaxDim];  // x and y may alias
    std::memcpy(tmp, x, sizeof(float) * d_);
    for (int i = 0; i < d_; ++i) {
        const float* row = &matrix_[static_cast<std::size_t>(i) * d_];
        float acc = 0.0f;
        for (int k = 0; k < d_; ++k) acc += row[k] * tmp[k];
        y[i] = acc;
    }
}

void Rotation::inverse(const float* y, float* x) const {
    if (hadamard_) {
        if (x != y) std::memcpy(x, y, sizeof(float) * d_);
        fwht_orthonormal(x, d_);
        for (int i = 0; i < d_; ++i) x[i] *= signs_[i];
        return;
    }
    float tmp[kMaxDim];
    std::memcpy(tmp, y, sizeof(float) * d_);
    for (int k = 0; k < d_; ++k) x[k] = 0.0f;
    for (int i = 0; i < d_; ++i) {
        const float* row = &matrix_[static_cast<std::size_t>(i) * d_];
        const float yi = tmp[i];
        for (int k = 0; k < d_; ++k) x[k] += row[k] * yi;
    }
}

std::size_t Rotation::parameter_bytes() const {
    return (signs_.size() + matrix_.size()) * sizeof(float);
}

}  // namespace veloxquant
