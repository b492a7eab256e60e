#include "methods/vecinfer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "core/cpu_isa.h"
#include "core/rng.h"
#include "core/x86_intrinsics.h"

namespace veloxquant {
namespace {

// Base seed of the calibrated rotation ("VECI"): fixed, so codebooks and caches agree whatever
// KVCacheConfig.seed is.
constexpr uint64_t kRotationBase = 0x56454349;

const char* kCalibrationHint =
    " from calibration; produce it with calibrate_vecinfer(activations, bits, seed) or `veloxquant "
    "calibrate "
    "--method vecinfer`";

int log2_exact(int c) {
    int b = 0;
    while ((1 << b) < c) ++b;
    return (1 << b) == c ? b : -1;
}

int checked_dim(int d, int num_subspaces, int codewords) {
    if (d < 1 || d > Rotation::kMaxDim)
        throw std::invalid_argument("vecinfer: head_dim must be in 1.." +
                                    std::to_string(Rotation::kMaxDim) + ", got " +
                                    std::to_string(d));
    if (num_subspaces < 1 || d % num_subspaces != 0)
        throw std::invalid_argument("vecinfer: num_subspaces (" + std::to_string(num_subspaces) +
                                    ") must divide head_dim " + std::to_string(d));
    if (codewords < 2 || codewords > kVecInferMaxCodewords || log2_exact(codewords) < 0)
        throw std::invalid_argument(
            "vecinfer: codewords per subspace must be a power of two in 2.." +
            std::to_string(kVecInferMaxCodewords) + ", got " + std::to_string(codewords));
    return d;
}

std::string shape_string(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

void check_size(const char* field, const FloatArray& a) {
    for (int64_t e : a.shape)
        if (e < 1)
            throw std::invalid_argument(std::string("KVCacheConfig.") + field + " has shape " +
                                        shape_string(a.shape) + " with a non-positive extent");
    const int64_t n = a.shape_size();
    if (static_cast<int64_t>(a.data.size()) != n)
        throw std::invalid_argument(std::string("KVCacheConfig.") + field + " holds " +
                                    std::to_string(a.data.size()) + " values but its shape " +
                                    shape_string(a.shape) + " needs " + std::to_string(n));
}

// Offset of (layer, head)'s block of `block` floats in a [L][H][...] array, checking the range.
std::size_t slice_offset(const char* field, const FloatArray& a, int layer, int head,
                         std::size_t block) {
    if (layer >= a.shape[0])
        throw std::invalid_argument(std::string("KVCacheConfig.") + field + " has " +
                                    std::to_string(a.shape[0]) + " layers (shape " +
                                    shape_string(a.shape) + "), but a cache for layer " +
                                    std::to_string(layer) + " was asked for");
    if (head >= a.shape[1])
        throw std::invalid_argument(std::string("KVCacheConfig.") + field + " has " +
                                    std::to_string(a.shape[1]) + " KV heads per layer (shape " +
                                    shape_string(a.shape) + "), but the cache has head " +
                                    std::to_string(head));
    return (static_cast<std::size_t>(layer) * a.shape[1] + head) * block;
}

}  // namespace

namespace {

// ||x - c||^2 = ||x||^2 - 2 (x.c - ||c||^2 / 2): the nearest codeword maximises
// v_c = x.c - ||c||^2 / 2, summed -||c||^2 / 2 + x_0 c_0 + x_1 c_1 + ... Each of eight lanes
// keeps the first maximum of the codewords c = lane (mod 8) of the full blocks of eight, in c
// order (lane[], lane_idx[]); returns the codewords covered (a multiple of 8).
constexpr int kLanes = 8;
using LaneMaximaFn = int (*)(const float* x, const float* codewords_t, const float* half_norm2,
                             int C, int sub_dim, float* lane, int* lane_idx);

// GCC/Clang vector extensions, two 4-float halves (the SSE width every x86-64 has).
int lane_maxima_generic(const float* x, const float* codewords_t, const float* half_norm2, int C,
                        int sub_dim, float* lane, int* lane_idx) {
    typedef float F4 __attribute__((vector_size(16)));
    typedef int32_t I4 __attribute__((vector_size(16)));
    F4 best_a = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, best_b = best_a;
    I4 idx_a = {0, 1, 2, 3}, idx_b = {4, 5, 6, 7};
    I4 cur_a = idx_a, cur_b = idx_b;
    int c = 0;
    for (; c + kLanes <= C; c += kLanes, cur_a += kLanes, cur_b += kLanes) {
        F4 va, vb, ca, cb;
        std::memcpy(&va, half_norm2 + c, sizeof va);
        std::memcpy(&vb, half_norm2 + c + 4, sizeof vb);
        va = -va;
        vb = -vb;
        for (int j = 0; j < sub_dim; ++j) {
            const float* col = codewords_t + static_cast<std::size_t>(j) * C + c;
            std::memcpy(&ca, col, sizeof ca);
            std::memcpy(&cb, col + 4, sizeof cb);
            va += x[j] * ca;
            vb += x[j] * cb;
        }
        const I4 ba = va > best_a, bb = vb > best_b;
        best_a = ba ? va : best_a;
        best_b = bb ? vb : best_b;
        idx_a = ba ? cur_a : idx_a;
        idx_b = bb ? cur_b : idx_b;
    }
    for (int l = 0; l < 4; ++l) {
        lane[l] = best_a[l], lane_idx[l] = idx_a[l];
        lane[l + 4] = best_b[l], lane_idx[l + 4] = idx_b[l];
    }
    return c;
}

#ifdef VQ_X86_KERNELS
// One block's values v: each lane takes v where it beats the lane's best (the first maximum).
__attribute__((target("avx2"), always_inline)) inline void take_block(__m256 v, __m256& best,
                                                                      __m256i& idx, __m256i& cur) {
    const __m256 better = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, v, better);
    idx = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(idx), _mm256_castsi256_ps(cur), better));
    cur = _mm256_add_epi32(cur, _mm256_set1_epi32(kLanes));
}

// The lanes as one 256-bit register, two blocks a step (the first block's test, then the
// second's: each lane still sees its codewords in c order). Built for AVX2 without FMA, so that
// every value rounds as the generic build's (a multiply, then an add).
__attribute__((target("avx2"))) int lane_maxima_avx2(const float* x, const float* codewords_t,
                                                     const float* half_norm2, int C, int sub_dim,
                                                     float* lane, int* lane_idx) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 best = _mm256_set1_ps(-INFINITY);
    __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = idx;
    int c = 0;
    for (; c + 2 * kLanes <= C; c += 2 * kLanes) {
        __m256 v0 = _mm256_xor_ps(_mm256_loadu_ps(half_norm2 + c), sign);
        __m256 v1 = _mm256_xor_ps(_mm256_loadu_ps(half_norm2 + c + kLanes), sign);
        for (int j = 0; j < sub_dim; ++j) {
            const __m256 xj = _mm256_set1_ps(x[j]);
            const float* col = codewords_t + static_cast<std::size_t>(j) * C + c;
            v0 = _mm256_add_ps(v0, _mm256_mul_ps(xj, _mm256_loadu_ps(col)));
            v1 = _mm256_add_ps(v1, _mm256_mul_ps(xj, _mm256_loadu_ps(col + kLanes)));
        }
        take_block(v0, best, idx, cur);
        take_block(v1, best, idx, cur);
    }
    for (; c + kLanes <= C; c += kLanes) {
        __m256 v = _mm256_xor_ps(_mm256_loadu_ps(half_norm2 + c), sign);
        for (int j = 0; j < sub_dim; ++j)
            v = _mm256_add_ps(
                v,
                _mm256_mul_ps(_mm256_set1_ps(x[j]),
                              _mm256_loadu_ps(codewords_t + static_cast<std::size_t>(j) * C + c)));
        take_block(v, best, idx, cur);
    }
    _mm256_storeu_ps(lane, best);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lane_idx), idx);
    return c;
}
#endif

}  // namespace

int nearest_codeword(const float* x, const float* codewords_t, const float* half_norm2, int C,
                     int sub_dim, float* dist2) {
    float lane[kLanes];
    int lane_idx[kLanes];
#ifdef VQ_X86_KERNELS
    const LaneMaximaFn lane_maxima =
        kernel_for_isa<LaneMaximaFn>(lane_maxima_generic, lane_maxima_avx2, lane_maxima_avx2);
#else
    const LaneMaximaFn lane_maxima = lane_maxima_generic;
#endif
    int c = lane_maxima(x, codewords_t, half_norm2, C, sub_dim, lane, lane_idx);
    for (; c < C; ++c) {  // C < 8 (C is a power of two)
        float v = -half_norm2[c];
        for (int j = 0; j < sub_dim; ++j)
            v += x[j] * codewords_t[static_cast<std::size_t>(j) * C + c];
        const int l = c % kLanes;
        if (v > lane[l]) lane[l] = v, lane_idx[l] = c;
    }
    float best_v = lane[0];
    int best = std::min(lane_idx[0], C - 1);
    for (int l = 1; l < kLanes && l < C; ++l)
        if (lane[l] > best_v || (lane[l] == best_v && lane_idx[l] < best))
            best_v = lane[l], best = lane_idx[l];
    if (dist2 != nullptr) {
        float x2 = 0.0f;
        for (int j = 0; j < sub_dim; ++j) x2 += x[j] * x[j];
        *dist2 = std::max(0.0f, x2 - 2.0f * best_v);
    }
    return best;
}

Rotation vecinfer_rotation(int d, int layer, int head) {
    return Rotation(d, true,
                    derive_seed(kRotationBase, layer, head, d, RandomPurpose::kKeyRotation));
}

VecInferCodec::VecInferCodec(int d, int num_subspaces, int codewords, const float* codebook,
                             const float* smooth, Rotation rotation)
    : KeyCodec(checked_dim(d, num_subspaces, codewords)),
      subspaces_(num_subspaces),
      codewords_(codewords),
      sub_dim_(d / num_subspaces),
      code_bits_(log2_exact(codewords)),
      code_bytes_(vecinfer_code_bytes(num_subspaces, log2_exact(codewords))),
      codebook_(codebook, codebook + static_cast<std::size_t>(d) * codewords),
      smooth_(smooth, smooth + d),
      rotation_(std::move(rotation)) {
    if (rotation_.dim() != d)
        throw std::invalid_argument("vecinfer: rotation of dimension " +
                                    std::to_string(rotation_.dim()) + " for head_dim " +
                                    std::to_string(d));
    inv_smooth_.resize(d);
    for (int j = 0; j < d; ++j) {
        if (!(std::isfinite(smooth_[j]) && smooth_[j] > 0.0f))
            throw std::invalid_argument("vecinfer: smooth_factors must be finite and > 0, got " +
                                        std::to_string(smooth_[j]) + " at channel " +
                                        std::to_string(j));
        inv_smooth_[j] = 1.0f / smooth_[j];
    }
    half_norm2_.resize(static_cast<std::size_t>(subspaces_) * codewords_);
    for (std::size_t e = 0; e < half_norm2_.size(); ++e) {
        const float* c = &codebook_[e * sub_dim_];
        double n2 = 0.0;
        for (int j = 0; j < sub_dim_; ++j) {
            if (!std::isfinite(c[j]))
                throw std::invalid_argument("vecinfer: codebook entry (subspace " +
                                            std::to_string(e / codewords_) + ", codeword " +
                                            std::to_string(e % codewords_) + ") is not finite");
            n2 += static_cast<double>(c[j]) * c[j];
        }
        half_norm2_[e] = static_cast<float>(0.5 * n2);
    }
    codebook_t_.resize(codebook_.size());
    for (int s = 0; s < subspaces_; ++s)
        for (int c = 0; c < codewords_; ++c)
            for (int j = 0; j < sub_dim_; ++j)
                codebook_t_[(static_cast<std::size_t>(s) * sub_dim_ + j) * codewords_ + c] =
                    codebook_[(static_cast<std::size_t>(s) * codewords_ + c) * sub_dim_ + j];
}

int VecInferCodec::nearest(int s, const float* x) const {
    const std::size_t off = static_cast<std::size_t>(s) * codewords_;
    return nearest_codeword(x, &codebook_t_[off * sub_dim_], &half_norm2_[off], codewords_,
                            sub_dim_);
}

uint32_t VecInferCodec::index(const uint8_t* code, int s) const {
    // Up to 12 bits starting at any bit: read the (at most 3) bytes the index touches.
    const std::size_t bit = static_cast<std::size_t>(s) * code_bits_;
    const std::size_t byte = bit >> 3;
    const unsigned shift = bit & 7u;
    const unsigned span = (shift + code_bits_ + 7) / 8;
    uint32_t word = 0;
    for (unsigned b = 0; b < span; ++b) word |= static_cast<uint32_t>(code[byte + b]) << (8 * b);
    return (word >> shift) & ((1u << code_bits_) - 1u);
}

void VecInferCodec::encode(const float* keys, int n, uint8_t* codes, float* /*scalars*/,
                           std::size_t /*scalar_stride*/) const {
    const int d = dim();
    std::vector<float> x(d);
    for (int t = 0; t < n; ++t) {
        const float* k = keys + static_cast<std::size_t>(t) * d;
        for (int j = 0; j < d; ++j) x[j] = k[j] * inv_smooth_[j];
        rotation_.forward(x.data(), x.data());
        uint8_t* code = codes + static_cast<std::size_t>(t) * code_bytes_;
        std::fill(code, code + code_bytes_, uint8_t{0});
        for (int s = 0; s < subspaces_; ++s) {
            const uint32_t idx =
                static_cast<uint32_t>(nearest(s, &x[static_cast<std::size_t>(s) * sub_dim_]));
            const std::size_t bit = static_cast<std::size_t>(s) * code_bits_;
            const uint32_t shifted = idx << (bit & 7u);
            for (std::size_t b = bit >> 3, v = shifted; v != 0; ++b, v >>= 8)
                code[b] |= static_cast<uint8_t>(v);
        }
    }
}

void VecInferCodec::decode(const uint8_t* codes, const float* /*scalars*/,
                           std::size_t /*scalar_stride*/, int n, float* keys) const {
    const int d = dim();
    std::vector<float> x(d);
    for (int t = 0; t < n; ++t) {
        const uint8_t* code = codes + static_cast<std::size_t>(t) * code_bytes_;
        for (int s = 0; s < subspaces_; ++s) {
            const float* c =
                &codebook_[(static_cast<std::size_t>(s) * codewords_ + index(code, s)) * sub_dim_];
            std::copy(c, c + sub_dim_, &x[static_cast<std::size_t>(s) * sub_dim_]);
        }
        float* out = keys + static_cast<std::size_t>(t) * d;
        rotation_.inverse(x.data(), out);
        for (int j = 0; j < d; ++j) out[j] *= smooth_[j];
    }
}

std::size_t VecInferCodec::query_state_size() const {
    return static_cast<std::size_t>(subspaces_) * codewords_;
}

void VecInferCodec::prepare_query(const float* query, float* state) const {
    // q.k = (q * lambda) . (k / lambda) = R (q * lambda) . R (k / lambda) (paper Eq. 7).
    const int d = dim();
    std::vector<float> q(d);
    for (int j = 0; j < d; ++j) q[j] = query[j] * smooth_[j];
    rotation_.forward(q.data(), q.data());
    for (int s = 0; s < subspaces_; ++s) {
        const float* qs = &q[static_cast<std::size_t>(s) * sub_dim_];
        const float* cb = &codebook_[static_cast<std::size_t>(s) * codewords_ * sub_dim_];
        float* lut = state + static_cast<std::size_t>(s) * codewords_;
        for (int c = 0; c < codewords_; ++c) {
            const float* w = cb + static_cast<std::size_t>(c) * sub_dim_;
            float dot = 0.0f;
            for (int j = 0; j < sub_dim_; ++j) dot += qs[j] * w[j];
            lut[c] = dot;
        }
    }
}

void VecInferCodec::score(const float* state, const uint8_t* codes, const float* /*scalars*/,
                          std::size_t /*scalar_stride*/, int n, float* scores) const {
    const std::size_t C = static_cast<std::size_t>(codewords_);
    if (code_bits_ == 8) {
        // One byte per subspace: four independent add chains over direct byte reads.
        for (int t = 0; t < n; ++t) {
            const uint8_t* code = codes + static_cast<std::size_t>(t) * code_bytes_;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            int s = 0;
            for (; s + 4 <= subspaces_; s += 4) {
                a0 += state[s * C + code[s]];
                a1 += state[(s + 1) * C + code[s + 1]];
                a2 += state[(s + 2) * C + code[s + 2]];
                a3 += state[(s + 3) * C + code[s + 3]];
            }
            for (; s < subspaces_; ++s) a0 += state[s * C + code[s]];
            scores[t] = (a0 + a1) + (a2 + a3);
        }
        return;
    }
    for (int t = 0; t < n; ++t) {
        const uint8_t* code = codes + static_cast<std::size_t>(t) * code_bytes_;
        float a0 = 0.0f, a1 = 0.0f;
        int s = 0;
        for (; s + 2 <= subspaces_; s += 2) {
            a0 += state[s * C + index(code, s)];
            a1 += state[(s + 1) * C + index(code, s + 1)];
        }
        for (; s < subspaces_; ++s) a0 += state[s * C + index(code, s)];
        scores[t] = a0 + a1;
    }
}

std::size_t VecInferCodec::parameter_bytes() const {
    return rotation_.parameter_bytes() +
           (codebook_.size() + codebook_t_.size() + half_norm2_.size() + smooth_.size() +
            inv_smooth_.size()) *
               sizeof(float);
}

std::unique_ptr<KeyCodec> make_vecinfer_codec(const KVCacheConfig& config, int head_dim, int layer,
                                              int head) {
    const FloatArray& cb = config.codebook;
    const FloatArray& sm = config.smooth_factors;
    if (cb.empty())
        throw std::invalid_argument(
            std::string(
                "method 'vecinfer' needs calibration: KVCacheConfig.codebook (product-VQ codewords "
                "per layer and KV head)") +
            kCalibrationHint);
    if (sm.empty())
        throw std::invalid_argument(
            std::string(
                "method 'vecinfer' needs calibration: KVCacheConfig.smooth_factors (per-channel "
                "smoothing of the keys)") +
            kCalibrationHint);
    if (cb.shape.size() != 3 && cb.shape.size() != 5)
        throw std::invalid_argument(
            "KVCacheConfig.codebook must have shape [layers][kv_heads][subspaces]"
            "[codewords][sub_dim] or [subspaces][codewords][sub_dim], got " +
            shape_string(cb.shape));
    if (sm.shape.size() != 1 && sm.shape.size() != 3)
        throw std::invalid_argument(
            "KVCacheConfig.smooth_factors must have shape [layers][kv_heads][head_dim] "
            "or [head_dim], got " +
            shape_string(sm.shape));
    check_size("codebook", cb);
    check_size("smooth_factors", sm);
    const std::size_t r = cb.shape.size();
    const int S = static_cast<int>(cb.shape[r - 3]);
    const int64_t C = cb.shape[r - 2];
    const int64_t sub = cb.shape[r - 1];
    if (static_cast<int64_t>(S) * sub != head_dim)
        throw std::invalid_argument("KVCacheConfig.codebook shape " + shape_string(cb.shape) +
                                    ": " + std::to_string(S) + " subspaces x sub_dim " +
                                    std::to_string(sub) + " must equal head_dim " +
                                    std::to_string(head_dim));
    if (C < 2 || C > kVecInferMaxCodewords || log2_exact(static_cast<int>(C)) < 0)
        throw std::invalid_argument("KVCacheConfig.codebook has " + std::to_string(C) +
                                    " codewords per subspace; need a power of two in 2.." +
                                    std::to_string(kVecInferMaxCodewords));
    if (config.num_subspaces && *config.num_subspaces != S)
        throw std::invalid_argument(
            "KVCacheConfig.num_subspaces (" + std::to_string(*config.num_subspaces) +
            ") does not match the codebook's " + std::to_string(S) + " subspaces");
    const int code_bits = log2_exact(static_cast<int>(C));
    if (static_cast<int64_t>(config.bits) * sub != code_bits)
        throw std::invalid_argument("KVCacheConfig.bits (" + std::to_string(config.bits) +
                                    ") does not match the vecinfer codebook's rate: log2(" +
                                    std::to_string(C) + " codewords) / sub_dim " +
                                    std::to_string(sub) + " = " +
                                    std::to_string(static_cast<double>(code_bits) / sub) +
                                    " bits per coordinate; set bits to match or recalibrate");
    if (sm.shape.back() != head_dim)
        throw std::invalid_argument("KVCacheConfig.smooth_factors shape " + shape_string(sm.shape) +
                                    " has " + std::to_string(sm.shape.back()) +
                                    " channels, head_dim is " + std::to_string(head_dim));
    const std::size_t cb_block = static_cast<std::size_t>(head_dim) * C;
    const std::size_t cb_off = r == 5 ? slice_offset("codebook", cb, layer, head, cb_block) : 0;
    const std::size_t sm_off =
        sm.shape.size() == 3 ? slice_offset("smooth_factors", sm, layer, head, head_dim) : 0;
    return std::make_unique<VecInferCodec>(head_dim, S, static_cast<int>(C),
                                           cb.data.data() + cb_off, sm.data.data() + sm_off,
                                           vecinfer_rotation(head_dim, layer, head));
}

}  // namespace veloxquant
