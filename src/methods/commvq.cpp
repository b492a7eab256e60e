#include "methods/commvq.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "core/bitpack.h"
#include "core/cpu_isa.h"
#include "core/x86_intrinsics.h"
#include "methods/byte_table_sums.h"
#include "methods/commvq_scores.h"

namespace veloxquant {
namespace {

// ICM sweeps after the greedy residual search (each never increases the error).
constexpr int kEncodeSweeps = 1;

std::string str(long long v) {
    return std::to_string(v);
}

int log2_exact(int c) {
    int b = 0;
    while ((1 << b) < c) ++b;
    return (1 << b) == c ? b : -1;
}

}  // namespace

namespace {

// v[c] = norms2[c] + sum_j (-2 x_j) w_j[c], j in order, for every codeword.
void commvq_values_generic(const float* x, const float* words_t, const float* norms2, int num_words,
                           int dim, float* v) {
    std::copy_n(norms2, num_words, v);
    for (int j = 0; j < dim; ++j) {
        const float xj = -2.0f * x[j];
        const float* wj = words_t + static_cast<std::size_t>(j) * num_words;
#pragma omp simd
        for (int c = 0; c < num_words; ++c) v[c] += xj * wj[c];
    }
}

#ifdef VQ_X86_KERNELS
// The same sums, 32 codewords in four registers across all coordinates (v is written once per
// block, not read and written once per coordinate). Built for AVX2 without FMA: no multiply can
// be fused into its add, so every value rounds as the generic loop's does.
__attribute__((target("avx2"))) void commvq_values_avx2(const float* x, const float* words_t,
                                                        const float* norms2, int num_words, int dim,
                                                        float* v) {
    int c0 = 0;
    for (; c0 + 32 <= num_words; c0 += 32) {
        __m256 acc[4];
        for (int b = 0; b < 4; ++b) acc[b] = _mm256_loadu_ps(norms2 + c0 + 8 * b);
        for (int j = 0; j < dim; ++j) {
            const __m256 xj = _mm256_set1_ps(-2.0f * x[j]);
            const float* wj = words_t + static_cast<std::size_t>(j) * num_words + c0;
            for (int b = 0; b < 4; ++b)
                acc[b] = _mm256_add_ps(acc[b], _mm256_mul_ps(xj, _mm256_loadu_ps(wj + 8 * b)));
        }
        for (int b = 0; b < 4; ++b) _mm256_storeu_ps(v + c0 + 8 * b, acc[b]);
    }
    for (; c0 + 8 <= num_words; c0 += 8) {
        __m256 acc = _mm256_loadu_ps(norms2 + c0);
        for (int j = 0; j < dim; ++j)
            acc = _mm256_add_ps(
                acc, _mm256_mul_ps(
                         _mm256_set1_ps(-2.0f * x[j]),
                         _mm256_loadu_ps(words_t + static_cast<std::size_t>(j) * num_words + c0)));
        _mm256_storeu_ps(v + c0, acc);
    }
    for (; c0 < num_words; ++c0) {
        float acc = norms2[c0];
        for (int j = 0; j < dim; ++j)
            acc += -2.0f * x[j] * words_t[static_cast<std::size_t>(j) * num_words + c0];
        v[c0] = acc;
    }
}

// commvq_nearest_bounded's first pass: every codeword's value with each product fused into its
// add (not the codec's values, which round each product, but within `margin` / 2 of them),
// then the codewords within `margin` of the least into idx; their count returned.
VQ_TARGET_AVX2 int commvq_fused_candidates(const float* x, const float* words_t,
                                           const float* norms2, int num_words, int dim,
                                           double margin, uint8_t* idx) {
    alignas(32) float v[256];
    __m256 least8 = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    int c0 = 0;
    for (; c0 + 32 <= num_words; c0 += 32) {
        __m256 acc[4];
        for (int b = 0; b < 4; ++b) acc[b] = _mm256_loadu_ps(norms2 + c0 + 8 * b);
        for (int j = 0; j < dim; ++j) {
            const __m256 xj = _mm256_set1_ps(-2.0f * x[j]);
            const float* wj = words_t + static_cast<std::size_t>(j) * num_words + c0;
            for (int b = 0; b < 4; ++b)
                acc[b] = _mm256_fmadd_ps(xj, _mm256_loadu_ps(wj + 8 * b), acc[b]);
        }
        for (int b = 0; b < 4; ++b) {
            _mm256_store_ps(v + c0 + 8 * b, acc[b]);
            least8 = _mm256_min_ps(least8, acc[b]);
        }
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, least8);
    float least = lanes[0];
    for (int l = 1; l < 8; ++l) least = std::min(least, lanes[l]);
    for (int c = c0; c < num_words; ++c) {
        float acc = norms2[c];
        for (int j = 0; j < dim; ++j)
            acc = std::fma(-2.0f * x[j], words_t[static_cast<std::size_t>(j) * num_words + c], acc);
        v[c] = acc;
        least = std::min(least, acc);
    }
    // The least float at or above least + margin: no codeword within the margin is left out.
    const double within = static_cast<double>(least) + margin;
    float cut = static_cast<float>(within);
    if (static_cast<double>(cut) < within) cut = std::nextafter(cut, INFINITY);
    int n = 0;
    const __m256 cut8 = _mm256_set1_ps(cut);
    int c = 0;
    for (; c + 8 <= num_words; c += 8) {
        unsigned bits = static_cast<unsigned>(
            _mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(v + c), cut8, _CMP_LE_OQ)));
        for (; bits != 0; bits &= bits - 1)
            idx[n++] = static_cast<uint8_t>(c + __builtin_ctz(bits));
    }
    for (; c < num_words; ++c)
        if (v[c] <= cut) idx[n++] = static_cast<uint8_t>(c);
    return n;
}
#endif

// The codec's value of codeword c (commvq_values_generic's operations for one codeword).
float commvq_value(const float* x, const float* words_t, const float* norms2, int num_words,
                   int dim, int c) {
    float acc = norms2[c];
    for (int j = 0; j < dim; ++j)
        acc += -2.0f * x[j] * words_t[static_cast<std::size_t>(j) * num_words + c];
    return acc;
}

}  // namespace

int commvq_nearest(const float* x, const float* words_t, const float* norms2, int num_words,
                   int dim) {
    // ||x - w||^2 = ||x||^2 - 2<x, w> + ||w||^2: the first term is common to every w.
    float v[256];
#ifdef VQ_X86_KERNELS
    kernel_for_isa(commvq_values_generic, commvq_values_avx2, commvq_values_avx2)(
        x, words_t, norms2, num_words, dim, v);
#else
    commvq_values_generic(x, words_t, norms2, num_words, dim, v);
#endif
    // The minimum (vectorised), then its first index.
    float m = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : m)
    for (int c = 0; c < num_words; ++c) m = std::min(m, v[c]);
    int best = 0;
    while (best + 1 < num_words && v[best] != m) ++best;
    return best;
}

void commvq_search_bound(const float* words_t, const float* norms2, int num_words, int dim,
                         float* bound) {
    bound[0] = 0.0f;
    for (int c = 0; c < num_words; ++c) bound[0] = std::max(bound[0], std::fabs(norms2[c]));
    for (int j = 0; j < dim; ++j) {
        const float* wj = words_t + static_cast<std::size_t>(j) * num_words;
        bound[1 + j] = 0.0f;
        for (int c = 0; c < num_words; ++c) bound[1 + j] = std::max(bound[1 + j], std::fabs(wj[c]));
    }
}

int commvq_nearest_bounded(const float* x, const float* words_t, const float* norms2,
                           const float* bound, int num_words, int dim) {
#ifdef VQ_X86_KERNELS
    if (cpu_isa() == CpuIsa::kGeneric) return commvq_nearest(x, words_t, norms2, num_words, dim);
    // T >= |norms2[c]| + sum_j |2 x_j w_j[c]| for every c. The codec's value rounds 2 dim + 1
    // times and the fused one dim times: each is within gamma_(dim+1) T and gamma_dim T of the
    // exact sum (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5), plus 2^-150
    // a product or fma that underflows, so |fused - codec| <= e below. A codeword whose fused
    // value exceeds the least fused value by more than 2 e has a codec value above that
    // codeword's: it is not the first minimum. Where T might overflow a float, or -2 x_j might
    // (its products with zero coordinates are then NaN), or x holds a NaN, the full search runs.
    double t = bound[0], largest = 0.0;
    for (int j = 0; j < dim; ++j) {
        const double a = std::fabs(static_cast<double>(x[j]));
        t += 2.0 * a * bound[1 + j];
        largest = std::max(largest, a);
    }
    if (!(t < 0x1p125) || !(largest < 0x1p125))
        return commvq_nearest(x, words_t, norms2, num_words, dim);
    const double u = 0x1p-24, e = (2 * dim + 2) * u * t * 1.001 + 2 * dim * 0x1p-150;
    uint8_t idx[256];
    const int n = commvq_fused_candidates(x, words_t, norms2, num_words, dim, 2.0 * e, idx);
    float m = 0.0f;
    int best = -1;
    for (int i = 0; i < n; ++i) {  // ascending c: the first of equal values stays
        const float exact = commvq_value(x, words_t, norms2, num_words, dim, idx[i]);
        if (best < 0 || exact < m) {
            m = exact;
            best = idx[i];
        }
    }
    return best >= 0 ? best : commvq_nearest(x, words_t, norms2, num_words, dim);
#else
    (void)bound;
    return commvq_nearest(x, words_t, norms2, num_words, dim);
#endif
}

void commvq_transpose(const float* words, int n, int dim, float* out) {
    for (int c = 0; c < n; ++c)
        for (int j = 0; j < dim; ++j)
            out[static_cast<std::size_t>(j) * n + c] = words[static_cast<std::size_t>(c) * dim + j];
}

void commvq_rope(float* x, int dim, const std::vector<double>& inv_freq, double pos) {
    const int pairs = std::min(static_cast<int>(inv_freq.size()), dim / 2);
    for (int i = 0; i < pairs; ++i) {
        const double a = pos * inv_freq[i], c = std::cos(a), s = std::sin(a);
        const double x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = static_cast<float>(x0 * c - x1 * s);
        x[2 * i + 1] = static_cast<float>(x0 * s + x1 * c);
    }
}

CommVQCodec::CommVQCodec(int d, const float* codebook, int stages, int groups, int codewords,
                         int group_dim, std::vector<double> rope_inv_freq)
    : KeyCodec(d),
      stages_(stages),
      groups_(groups),
      codewords_(codewords),
      group_dim_(group_dim),
      index_bits_(log2_exact(codewords)),
      inv_freq_(std::move(rope_inv_freq)) {
    if (d < 2 || d > kMaxDim || d % 2 != 0)
        throw std::invalid_argument("commvq: head_dim must be even and in 2.." + str(kMaxDim) +
                                    ", got " + str(d));
    if (stages < 1 || stages > 64)
        throw std::invalid_argument("commvq: stages must be in 1..64, got " + str(stages));
    if (group_dim < 2 || group_dim % 2 != 0)
        throw std::invalid_argument(
            "commvq: group_dim must be a positive even number (whole "
            "RoPE pairs), got " +
            str(group_dim));
    if (groups < 1 || static_cast<long long>(groups) * group_dim != d)
        throw std::invalid_argument("commvq: groups (" + str(groups) + ") x group_dim (" +
                                    str(group_dim) + ") must equal head_dim " + str(d));
    if (codewords < 2 || codewords > 256 || index_bits_ < 0)
        throw std::invalid_argument(
            "commvq: codewords per stage must be a power of two in "
            "2..256, got " +
            str(codewords));
    if (codebook == nullptr) throw std::invalid_argument("commvq: null codebook");
    if (static_cast<int>(inv_freq_.size()) > d / 2)
        throw std::invalid_argument("KVCacheConfig.rope_inv_freq has " + str(inv_freq_.size()) +
                                    " frequencies; head_dim " + str(d) + " has only " + str(d / 2) +
                                    " pairs");
    for (std::size_t i = 0; i < inv_freq_.size(); ++i)
        if (!std::isfinite(inv_freq_[i]) || inv_freq_[i] < 0.0)
            throw std::invalid_argument("KVCacheConfig.rope_inv_freq[" + str(i) +
                                        "] must be finite and >= 0");
    const std::size_t total = static_cast<std::size_t>(stages) * groups * codewords * group_dim;
    words_.assign(codebook, codebook + total);
    for (std::size_t i = 0; i < total; ++i)
        if (!std::isfinite(words_[i]))
            throw std::invalid_argument("KVCacheConfig.codebook holds a NaN or Inf codeword entry");
    words_t_.resize(total);
    for (std::size_t b = 0; b < total / (static_cast<std::size_t>(codewords) * group_dim); ++b)
        commvq_transpose(&words_[b * codewords * group_dim], codewords, group_dim,
                         &words_t_[b * codewords * group_dim]);
    norms2_.resize(total / group_dim);
    for (std::size_t w = 0; w < norms2_.size(); ++w) {
        double s = 0.0;
        for (int j = 0; j < group_dim; ++j)
            s += static_cast<double>(words_[w * group_dim + j]) * words_[w * group_dim + j];
        norms2_[w] = static_cast<float>(s);
    }
    const std::size_t slices = static_cast<std::size_t>(stages) * groups;
    bounds_.resize(slices * (1 + group_dim));
    for (std::size_t b = 0; b < slices; ++b)
        commvq_search_bound(&words_t_[b * codewords * group_dim], &norms2_[b * codewords],
                            codewords, group_dim, &bounds_[b * (1 + group_dim)]);
    const int pairs = static_cast<int>(inv_freq_.size());
    step_.resize(static_cast<std::size_t>(kPhaseBlock) * pairs * 2);
    for (int t = 0; t < kPhaseBlock; ++t)
        for (int i = 0; i < pairs; ++i) {
            const double a = t * inv_freq_[i];
            step_[(static_cast<std::size_t>(t) * pairs + i) * 2] = static_cast<float>(std::cos(a));
            step_[(static_cast<std::size_t>(t) * pairs + i) * 2 + 1] =
                static_cast<float>(std::sin(a));
        }
}

double CommVQCodec::bits_per_coordinate() const {
    return static_cast<double>(stages_) * index_bits_ / group_dim_;
}

std::size_t CommVQCodec::code_bytes() const {
    return packed_bytes(static_cast<std::size_t>(stages_) * groups_, index_bits_);
}

std::size_t CommVQCodec::parameter_bytes() const {
    return (words_.size() + words_t_.size() + norms2_.size() + step_.size()) * sizeof(float) +
           inv_freq_.size() * sizeof(double);
}

void CommVQCodec::phases(int pos0, int n, float* out) const {
    const int pairs = static_cast<int>(inv_freq_.size());
    double base[2 * kMaxDim / 2];
    // Blocks start at multiples of kPhaseBlock, so a position's phases do not depend on where
    // the run that holds it starts (an append to a partly filled page encodes with the phases
    // its tokens are decoded and scored with; the device codec computes the same).
    for (int t0 = 0; t0 < n;) {
        const int p = pos0 + t0, offset = p % kPhaseBlock;
        const int t1 = std::min(n, t0 + kPhaseBlock - offset);
        // exp(j (p_b + t) w) = exp(j p_b w) exp(j t w): exact angle once per block.
        const double pb = static_cast<double>(p - offset);
        for (int i = 0; i < pairs; ++i) {
            base[2 * i] = std::cos(pb * inv_freq_[i]);
            base[2 * i + 1] = std::sin(pb * inv_freq_[i]);
        }
        for (int t = t0; t < t1; ++t) {
            const float* st = &step_[static_cast<std::size_t>(t - t0 + offset) * pairs * 2];
            float* o = out + static_cast<std::size_t>(t) * pairs * 2;
            for (int i = 0; i < pairs; ++i) {
                const double c = st[2 * i], s = st[2 * i + 1];
                o[2 * i] = static_cast<float>(base[2 * i] * c - base[2 * i + 1] * s);
                o[2 * i + 1] = static_cast<float>(base[2 * i] * s + base[2 * i + 1] * c);
            }
        }
        t0 = t1;
    }
}

void CommVQCodec::quantize(const float* x, int* indices) const {
    const int gd = group_dim_, C = codewords_;
    float r[kMaxDim];
    for (int g = 0; g < groups_; ++g) {
        std::copy_n(x + g * gd, gd, r);
        auto norms = [&](int s) {
            return &norms2_[(static_cast<std::size_t>(s) * groups_ + g) * C];
        };
        auto wt = [&](int s) {
            return &words_t_[(static_cast<std::size_t>(s) * groups_ + g) * C * gd];
        };
        auto bound = [&](int s) {
            return &bounds_[(static_cast<std::size_t>(s) * groups_ + g) * (1 + gd)];
        };
        auto sub = [&](int s, int c, float sign) {
            const float* w = word(s, g, c);
            for (int j = 0; j < gd; ++j) r[j] -= sign * w[j];
        };
        // Greedy: each stage codes what the previous stages left.
        for (int s = 0; s < stages_; ++s) {
            int& idx = indices[s * groups_ + g];
            idx = commvq_nearest_bounded(r, wt(s), norms(s), bound(s), C, gd);
            sub(s, idx, 1.0f);
        }
        // ICM: re-choose each stage's codeword given all the others (r + w_s is the target).
        for (int sweep = 0; sweep < kEncodeSweeps && stages_ > 1; ++sweep)
            for (int s = 0; s < stages_; ++s) {
                int& idx = indices[s * groups_ + g];
                sub(s, idx, -1.0f);
                idx = commvq_nearest_bounded(r, wt(s), norms(s), bound(s), C, gd);
                sub(s, idx, 1.0f);
            }
    }
}

void CommVQCodec::pack(const int* indices, uint8_t* code) const {
    uint8_t idx[kMaxDim * 64 / 2];
    const int m = stages_ * groups_;
    for (int i = 0; i < m; ++i) idx[i] = static_cast<uint8_t>(indices[i]);
    pack_bits(idx, m, index_bits_, code);
}

int CommVQCodec::index(const uint8_t* code, int m) const {
    // 256 codewords (what calibration makes): one index per byte.
    return index_bits_ == 8 ? code[m] : static_cast<int>(read_packed(code, m, index_bits_));
}

void CommVQCodec::reconstruct(const uint8_t* code, float* z) const {
    const int gd = group_dim_;
    std::fill(z, z + dim(), 0.0f);
    for (int s = 0; s < stages_; ++s)
        for (int g = 0; g < groups_; ++g) {
            const float* w = word(s, g, index(code, s * groups_ + g));
            float* zg = z + g * gd;
#pragma omp simd
            for (int j = 0; j < gd; ++j) zg[j] += w[j];
        }
}

void CommVQCodec::encode(const float* keys, int n, uint8_t* codes, float* scalars,
                         std::size_t scalar_stride) const {
    encode_at(keys, n, 0, codes, scalars, scalar_stride);
}

void CommVQCodec::decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride,
                         int n, float* keys) const {
    decode_at(codes, scalars, scalar_stride, n, 0, keys);
}

void CommVQCodec::score(const float* state, const uint8_t* codes, const float* scalars,
                        std::size_t scalar_stride, int n, float* scores) const {
    score_at(state, codes, scalars, scalar_stride, n, 0, scores);
}

void CommVQCodec::encode_at(const float* keys, int n, int pos0, uint8_t* codes, float*,
                            std::size_t) const {
    const int d = dim(), pairs = static_cast<int>(inv_freq_.size());
    std::vector<float> ph(static_cast<std::size_t>(std::min(n, kPhaseBlock)) * pairs * 2);
    std::vector<int> indices(static_cast<std::size_t>(stages_) * groups_);
    float z[kMaxDim];
    for (int t0 = 0; t0 < n; t0 += kPhaseBlock) {
        const int nb = std::min(kPhaseBlock, n - t0);
        if (pairs > 0) phases(pos0 + t0, nb, ph.data());
        for (int t = t0; t < t0 + nb; ++t) {
            const float* k = keys + static_cast<std::size_t>(t) * d;
            std::copy_n(k, d, z);
            // Un-rotate: z_i = k_i exp(-j p w_i).
            const float* e = ph.data() + static_cast<std::size_t>(t - t0) * pairs * 2;
            for (int i = 0; i < pairs; ++i) {
                const float c = e[2 * i], s = e[2 * i + 1];
                z[2 * i] = k[2 * i] * c + k[2 * i + 1] * s;
                z[2 * i + 1] = k[2 * i + 1] * c - k[2 * i] * s;
            }
            quantize(z, indices.data());
            pack(indices.data(), codes + static_cast<std::size_t>(t) * code_bytes());
        }
    }
}

void CommVQCodec::decode_at(const uint8_t* codes, const float*, std::size_t, int n, int pos0,
                            float* keys) const {
    const int d = dim(), pairs = static_cast<int>(inv_freq_.size());
    std::vector<float> ph(static_cast<std::size_t>(std::min(n, kPhaseBlock)) * pairs * 2);
    for (int t0 = 0; t0 < n; t0 += kPhaseBlock) {
        const int nb = std::min(kPhaseBlock, n - t0);
        if (pairs > 0) phases(pos0 + t0, nb, ph.data());
        for (int t = t0; t < t0 + nb; ++t) {
            float* k = keys + static_cast<std::size_t>(t) * d;
            reconstruct(codes + static_cast<std::size_t>(t) * code_bytes(), k);
            const float* e = ph.data() + static_cast<std::size_t>(t - t0) * pairs * 2;
            for (int i = 0; i < pairs; ++i) {
                const float c = e[2 * i], s = e[2 * i + 1], z0 = k[2 * i], z1 = k[2 * i + 1];
                k[2 * i] = z0 * c - z1 * s;
                k[2 * i + 1] = z0 * s + z1 * c;
            }
        }
    }
}

std::size_t CommVQCodec::query_state_size() const {
    // Positional: the query itself (its rotation depends on the token). Otherwise the tables.
    return positional() ? static_cast<std::size_t>(dim())
                        : static_cast<std::size_t>(stages_) * groups_ * codewords_;
}

void CommVQCodec::prepare_query(const float* query, float* state) const {
    if (positional()) {
        std::copy_n(query, dim(), state);
        return;
    }
    // Without RoPE, <q, z_hat> = sum_{s,G} <q_G, W[s][G][i_{s,G}]>: one table per index m =
    // s * groups + G of the code, state[m * codewords + c] = <q_G, W[s][G][c]> (as vecinfer).
    // Over the transposed codewords, so that each table's entries vectorise.
    const int gd = group_dim_, C = codewords_;
    for (std::size_t m = 0; m < static_cast<std::size_t>(stages_) * groups_; ++m) {
        const float* qg = query + (m % groups_) * gd;
        const float* wt = &words_t_[m * C * gd];
        float* table = state + m * C;
        std::fill(table, table + C, 0.0f);
        for (int j = 0; j < gd; ++j) {
            const float qj = qg[j];
#pragma omp simd
            for (int c = 0; c < C; ++c) table[c] += qj * wt[j * C + c];
        }
    }
}

void CommVQCodec::score_at(const float* state, const uint8_t* codes, const float* scalars,
                           std::size_t scalar_stride, int n, int pos0, float* scores) const {
    score_rows_at(state, 0, 1, codes, scalars, scalar_stride, n, pos0, scores, 0);
}

void CommVQCodec::score_rows_at(const float* states, std::size_t state_stride, int rows,
                                const uint8_t* codes, const float*, std::size_t, int n, int pos0,
                                float* scores, std::size_t score_stride) const {
    if (positional()) {
        commvq_rope_scores(*this, states, state_stride, rows, codes, n, pos0, scores, score_stride);
        return;
    }
    const int m = stages_ * groups_;
    const std::size_t cb = code_bytes();
    for (int r = 0; r < rows; ++r) {
        const float* tables = states + r * state_stride;
        float* out = scores + r * score_stride;
        // 256 codewords (what calibration makes): one code byte per table, one running sum.
        if (index_bits_ == 8) {
            byte_table_sums(tables, codes, cb, m, n, 1, out);
            continue;
        }
        for (int t = 0; t < n; ++t) {
            const uint8_t* code = codes + t * cb;
            float acc = 0.0f;
            for (int i = 0; i < m; ++i) acc += tables[i * codewords_ + index(code, i)];
            out[t] = acc;
        }
    }
}

std::unique_ptr<CommVQCodec> make_commvq_codec(const KVCacheConfig& config, int head_dim, int layer,
                                               int head) {
    const FloatArray& cb = config.codebook;
    if (cb.empty())
        throw std::invalid_argument(
            "method 'commvq' needs calibration: KVCacheConfig.codebook is empty; produce it with "
            "calibrate_commvq(activations, bits, seed) or `veloxquant calibrate --method commvq`");
    if (cb.shape.size() != 6)
        throw std::invalid_argument(
            "KVCacheConfig.codebook for commvq must have shape [layers]"
            "[kv_heads][stages][groups][codewords][group_dim], got rank " +
            str(cb.shape.size()));
    for (int64_t s : cb.shape)
        if (s < 1) throw std::invalid_argument("KVCacheConfig.codebook has an empty dimension");
    const int64_t count = cb.shape_size();
    if (count < 0 || count > (int64_t{1} << 40))
        throw std::invalid_argument("KVCacheConfig.codebook is too large");
    if (static_cast<std::size_t>(count) != cb.data.size())
        throw std::invalid_argument("KVCacheConfig.codebook holds " + str(cb.data.size()) +
                                    " floats but its shape needs " + str(count));
    if (layer >= cb.shape[0])
        throw std::invalid_argument("KVCacheConfig.codebook has " + str(cb.shape[0]) +
                                    " layers; layer " + str(layer) + " has no codebook");
    if (head >= cb.shape[1])
        throw std::invalid_argument("KVCacheConfig.codebook has " + str(cb.shape[1]) +
                                    " KV heads per layer; head " + str(head) + " has no codebook");
    const int stages = static_cast<int>(cb.shape[2]), groups = static_cast<int>(cb.shape[3]);
    const int words = static_cast<int>(cb.shape[4]), gd = static_cast<int>(cb.shape[5]);
    if (static_cast<long long>(groups) * gd != head_dim)
        throw std::invalid_argument("KVCacheConfig.codebook groups (" + str(groups) +
                                    ") x group_dim (" + str(gd) + ") must equal head_dim " +
                                    str(head_dim));
    const int ib = log2_exact(words);
    if (ib < 1 || words > 256)
        throw std::invalid_argument(
            "KVCacheConfig.codebook codewords per stage must be a power of "
            "two in 2..256, got " +
            str(words));
    if (static_cast<long long>(stages) * ib != static_cast<long long>(config.bits) * gd)
        throw std::invalid_argument(
            "KVCacheConfig.bits = " + str(config.bits) + " does not match the commvq codebook: " +
            str(stages) + " stages x " + str(ib) + " bits per group of " + str(gd) +
            " coordinates = " + std::to_string(static_cast<double>(stages) * ib / gd) +
            " bits per coordinate");
    if (config.num_subspaces && *config.num_subspaces != stages)
        throw std::invalid_argument("KVCacheConfig.num_subspaces (" + str(*config.num_subspaces) +
                                    ") must equal the commvq codebook's stages (" + str(stages) +
                                    ")");
    const std::size_t per_head = static_cast<std::size_t>(stages) * groups * words * gd;
    const float* slice =
        cb.data.data() + (static_cast<std::size_t>(layer) * cb.shape[1] + head) * per_head;
    return std::make_unique<CommVQCodec>(head_dim, slice, stages, groups, words, gd,
                                         config.rope_inv_freq);
}

}  // namespace veloxquant
