#include "methods/spectral.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <stdexcept>
#include <string>

#include "core/cpu_isa.h"
#include "core/lloyd_max.h"
#include "core/x86_intrinsics.h"
#include "methods/spectral_scores.h"

namespace veloxquant {
namespace {

const char kCalibrateHint[] =
    "; produce it with calibrate_spectral_rotation (or `veloxquant calibrate --method spectral`)";

[[noreturn]] void bad_rotations(const std::string& what) {
    throw std::invalid_argument("spectral: KVCacheConfig.rotations " + what + kCalibrateHint);
}

int checked_dim(int d, int signal_bits, int noise_bits) {
    if (d < 2 || d > 1024)
        throw std::invalid_argument("spectral: head_dim must be in 2..1024, got " +
                                    std::to_string(d));
    if (signal_bits < 1 || signal_bits > 8)
        throw std::invalid_argument("spectral: KVCacheConfig.signal_bits must be in 1..8, got " +
                                    std::to_string(signal_bits));
    if (noise_bits < 0 || noise_bits > 8)
        throw std::invalid_argument("spectral: KVCacheConfig.noise_bits must be in 0..8, got " +
                                    std::to_string(noise_bits));
    return d;
}

}  // namespace

int participation_dim(const float* eigenvalues, int d) {
    double sum = 0.0, sq = 0.0;
    for (int i = 0; i < d; ++i) {
        const double l = std::max(0.0, static_cast<double>(eigenvalues[i]));
        sum += l;
        sq += l * l;
    }
    if (sq <= 0.0) return 1;
    // A relative slack keeps an exact integer ratio (equal eigenvalues) from rounding up.
    const double pr = sum * sum / sq;
    const int dim = static_cast<int>(std::ceil(pr * (1.0 - 1e-9)));
    return std::min(std::max(dim, 1), d);
}

std::vector<int> allocate_spectral_bits(const std::vector<double>& importance, int budget,
                                        int max_bits) {
    const int n = static_cast<int>(importance.size());
    if (max_bits < 1 || max_bits > 8)
        throw std::invalid_argument("allocate_spectral_bits: max_bits must be in 1..8, got " +
                                    std::to_string(max_bits));
    if (budget < 0 || budget > max_bits * n)
        throw std::invalid_argument("allocate_spectral_bits: budget " + std::to_string(budget) +
                                    " outside 0.." + std::to_string(max_bits * n));
    for (double w : importance)
        if (!(w >= 0.0) || !std::isfinite(w))
            throw std::invalid_argument(
                "allocate_spectral_bits: importances must be finite and >= 0");
    double dist[9];
    dist[0] = 1.0;
    for (int b = 1; b <= max_bits; ++b) dist[b] = gaussian_codebook(b).mse;
    // D is convex in b (the gains D(b) - D(b+1) fall), so taking the largest marginal gain
    // budget times is optimal for the separable sum. n is at most 1024 and the budget at most
    // 8n: a linear scan per bit is cheap next to the calibration that feeds it.
    std::vector<int> bits(n, 0);
    for (int step = 0; step < budget; ++step) {
        int best = -1;
        double best_gain = -1.0;
        for (int r = 0; r < n; ++r) {
            if (bits[r] >= max_bits) continue;
            const double gain = importance[r] * (dist[bits[r]] - dist[bits[r] + 1]);
            if (gain > best_gain) {
                best_gain = gain;
                best = r;
            }
        }
        ++bits[best];
    }
    return bits;
}

SpectralBasis spectral_basis_from_config(const KVCacheConfig& config, int head_dim, int layer,
                                         int head) {
    const int d = head_dim;
    if (config.rotations.empty())
        throw std::invalid_argument(
            std::string("method 'spectral' needs calibration: KVCacheConfig.rotations is "
                        "empty") +
            kCalibrateHint);
    if (layer < 0 || static_cast<std::size_t>(layer) >= config.rotations.size())
        bad_rotations("has " + std::to_string(config.rotations.size()) +
                      " layers, none for layer " + std::to_string(layer));
    const FloatArray& a = config.rotations[static_cast<std::size_t>(layer)];
    const std::string where = "[" + std::to_string(layer) + "]";
    if (a.shape.size() == 3 && a.shape[1] == d + 2 && a.shape[2] == d)
        bad_rotations(where + " has the [kv_heads][" + std::to_string(d + 2) + "][" +
                      std::to_string(d) +
                      "] rows of an older calibration without the query second moments; it "
                      "must have shape [kv_heads][" +
                      std::to_string(d + 3) + "][" + std::to_string(d) + "]: recalibrate");
    if (a.shape.size() != 3 || a.shape[1] != d + 3 || a.shape[2] != d)
        bad_rotations(where + " must have shape [kv_heads][" + std::to_string(d + 3) + "][" +
                      std::to_string(d) + "] for head_dim " + std::to_string(d));
    if (a.shape[0] <= head)
        bad_rotations(where + " has " + std::to_string(a.shape[0]) + " KV heads, none for head " +
                      std::to_string(head));
    const std::size_t per_head = static_cast<std::size_t>(d + 3) * d;
    if (a.data.size() != static_cast<std::size_t>(a.shape[0]) * per_head)
        bad_rotations(where + " holds " + std::to_string(a.data.size()) + " floats, not the " +
                      std::to_string(a.shape[0] * per_head) + " its shape needs");
    const float* p = a.data.data() + static_cast<std::size_t>(head) * per_head;
    const std::string at = where + " head " + std::to_string(head);
    for (std::size_t i = 0; i < per_head; ++i)
        if (!std::isfinite(p[i])) bad_rotations(at + " contains NaN or Inf");
    SpectralBasis b;
    b.basis.assign(p, p + static_cast<std::size_t>(d) * d);
    b.variances.assign(p + static_cast<std::size_t>(d) * d,
                       p + static_cast<std::size_t>(d + 1) * d);
    b.mean.assign(p + static_cast<std::size_t>(d + 1) * d, p + static_cast<std::size_t>(d + 2) * d);
    b.query_moments.assign(p + static_cast<std::size_t>(d + 2) * d, p + per_head);
    for (int i = 0; i < d; ++i) {
        if (b.query_moments[i] < 0.0f)
            bad_rotations(at + " has a negative query second moment (row " + std::to_string(d + 2) +
                          ")");
        if (b.variances[i] < 0.0f)
            bad_rotations(at + " has a negative eigenvalue (row " + std::to_string(d) + ")");
        if (i > 0 && b.variances[i] > b.variances[i - 1])
            bad_rotations(at + " eigenvalues (row " + std::to_string(d) +
                          ") are not in descending order");
    }
    if (!(b.variances[0] > 0.0f)) bad_rotations(at + " eigenvalues are all zero");
    // Orthonormal rows: |U U^T - I| <= 1e-3 entrywise.
    for (int r = 0; r < d; ++r)
        for (int s = r; s < d; ++s) {
            double g = 0.0;
            for (int j = 0; j < d; ++j)
                g += static_cast<double>(b.basis[r * d + j]) * b.basis[s * d + j];
            if (std::fabs(g - (r == s ? 1.0 : 0.0)) > 1e-3)
                bad_rotations(at + " eigenvectors (rows 0.." + std::to_string(d - 1) +
                              ") are not orthonormal (rows " + std::to_string(r) + ", " +
                              std::to_string(s) + ": dot " + std::to_string(g) + ")");
        }
    return b;
}

std::unique_ptr<KeyCodec> make_spectral_codec(const KVCacheConfig& config, int head_dim, int layer,
                                              int head) {
    checked_dim(head_dim, config.signal_bits, config.noise_bits);
    SpectralBasis b = spectral_basis_from_config(config, head_dim, layer, head);
    const int d_eff = participation_dim(b.variances.data(), head_dim);
    return std::make_unique<SpectralCodec>(head_dim, config.signal_bits, config.noise_bits,
                                           std::move(b), d_eff);
}

SpectralCodec::SpectralCodec(int d, int signal_bits, int noise_bits, SpectralBasis basis, int d_eff)
    : KeyCodec(checked_dim(d, signal_bits, noise_bits)),
      signal_bits_(signal_bits),
      noise_bits_(noise_bits),
      d_eff_(d_eff),
      budget_(0),
      basis_(std::move(basis)) {
    if (d_eff < 1 || d_eff > d)
        throw std::invalid_argument("spectral: d_eff must be in 1.." + std::to_string(d) +
                                    ", got " + std::to_string(d_eff));
    const std::size_t du = static_cast<std::size_t>(d);
    if (basis_.basis.size() != du * du || basis_.variances.size() != du ||
        basis_.mean.size() != du || basis_.query_moments.size() != du)
        throw std::invalid_argument(
            "spectral: basis must be [d][d], variances, mean and query_moments [d] for d = " +
            std::to_string(d));
    double top = 0.0;
    for (float v : basis_.variances) top = std::max(top, static_cast<double>(v));
    if (!(top > 0.0)) throw std::invalid_argument("spectral: variances must not all be zero");
    for (float w : basis_.query_moments)
        if (!(w >= 0.0f) || !std::isfinite(w))
            throw std::invalid_argument("spectral: query_moments must be finite and >= 0");
    sigma_.resize(du);
    for (int r = 0; r < d; ++r)
        sigma_[r] = std::sqrt(std::max(static_cast<double>(basis_.variances[r]), 1e-12 * top));

    // Expected score error of coordinate r at b bits: w_r lambda_r D(b).
    budget_ = signal_bits * d_eff + noise_bits * (d - d_eff);
    std::vector<double> importance(du);
    for (int r = 0; r < d; ++r)
        importance[r] = static_cast<double>(basis_.query_moments[r]) * sigma_[r] * sigma_[r];
    bits_ = allocate_spectral_bits(importance, budget_);
    // gaussian_codebook() takes a lock; the hot loops read these instead.
    codebooks_.fill(nullptr);
    for (int b : bits_)
        if (b > 0) codebooks_[b] = &gaussian_codebook(b);

    std::vector<int> order;
    for (int r = 0; r < d; ++r)
        if (bits_[r] > 0) order.push_back(r);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return bits_[a] > bits_[b]; });
    std::size_t bit_at = 0;
    for (int r : order) {
        Slot s;
        s.coord = r;
        s.bits = bits_[r];
        s.bit_offset = bit_at;
        bit_at += static_cast<std::size_t>(s.bits);
        slots_.push_back(s);
    }
    code_bytes_ = (bit_at + 7) / 8;
    // A run of consecutive slots of at most 4 bits in all shares a 16-entry table (one vpermps
    // looks it up for 16 tokens); a wider slot (they come first) has a table of its own.
    std::size_t table_at = 1;  // state[0] = <q, mu>
    for (std::size_t k = 0; k < slots_.size();) {
        Group g;
        g.first = k;
        g.bit_offset = slots_[k].bit_offset;
        g.table_offset = table_at;
        const int cap = std::max(4, slots_[k].bits);
        while (k < slots_.size() && g.bits + slots_[k].bits <= cap) g.bits += slots_[k++].bits;
        g.count = k - g.first;
        table_at += g.entries();
        groups_.push_back(g);
    }
    state_size_ = table_at;
}

double SpectralCodec::nominal_bits_per_coordinate() const {
    return (static_cast<double>(budget_) + 32.0) / dim();
}

namespace {

// b bits (1..8) at bit `at` of an LSB-first stream.
inline unsigned read_field(const uint8_t* code, std::size_t at, int bits) {
    const std::size_t byte = at >> 3;
    const unsigned shift = static_cast<unsigned>(at & 7u);
    unsigned word = code[byte];
    if (shift + static_cast<unsigned>(bits) > 8) word |= static_cast<unsigned>(code[byte + 1]) << 8;
    return (word >> shift) & ((1u << bits) - 1u);
}

inline void write_field(uint8_t* code, std::size_t at, int bits, unsigned v) {
    const std::size_t byte = at >> 3;
    const unsigned shift = static_cast<unsigned>(at & 7u);
    const unsigned word = v << shift;
    code[byte] = static_cast<uint8_t>(code[byte] | (word & 0xffu));
    if (shift + static_cast<unsigned>(bits) > 8)
        code[byte + 1] = static_cast<uint8_t>(code[byte + 1] | (word >> 8));
}

}  // namespace

void SpectralCodec::project_slots(const double* centered, float* y) const {
    const int d = dim();
    const std::size_t n = slots_.size();
    const auto row = [&](std::size_t k) {
        return &basis_.basis[static_cast<std::size_t>(slots_[k].coord) * d];
    };
    // Four rows at a time: four independent sums (each over j in order), so the additions'
    // latency overlaps; the operations are one row's.
    std::size_t k = 0;
    for (; k + 4 <= n; k += 4) {
        const float *u0 = row(k), *u1 = row(k + 1), *u2 = row(k + 2), *u3 = row(k + 3);
        double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
        for (int j = 0; j < d; ++j) {
            a0 += static_cast<double>(u0[j]) * centered[j];
            a1 += static_cast<double>(u1[j]) * centered[j];
            a2 += static_cast<double>(u2[j]) * centered[j];
            a3 += static_cast<double>(u3[j]) * centered[j];
        }
        y[k] = static_cast<float>(a0);
        y[k + 1] = static_cast<float>(a1);
        y[k + 2] = static_cast<float>(a2);
        y[k + 3] = static_cast<float>(a3);
    }
    for (; k < n; ++k) {
        const float* u = row(k);
        double acc = 0.0;
        for (int j = 0; j < d; ++j) acc += static_cast<double>(u[j]) * centered[j];
        y[k] = static_cast<float>(acc);
    }
}

namespace {

// y[k] = sum_j rows_t[j][k] centered[j] for k < width (a multiple of 8; rows_t [d][width]): the
// coded directions' rows transposed, so that a register holds one coordinate of 8 or 16 rows.
// Each lane runs one row's sum as project_slots does (the float exact in double, a rounded
// multiply, a rounded add, j in order); the empty asm keeps the compiler, which may contract
// intrinsics under these targets, from fusing the multiply into the add.
using ProjectFn = void (*)(const float* rows_t, int d, int width, const double* centered, float* y);

#ifdef VQ_X86_KERNELS
VQ_TARGET_AVX2 void project_avx2(const float* rows_t, int d, int width, const double* centered,
                                 float* y) {
    for (int k = 0; k < width; k += 8) {
        __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
        for (int j = 0; j < d; ++j) {
            const float* u = rows_t + static_cast<std::size_t>(j) * width + k;
            const __m256d c = _mm256_set1_pd(centered[j]);
            __m256d p_lo = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(u)), c);
            __m256d p_hi = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(u + 4)), c);
            asm("" : "+x"(p_lo), "+x"(p_hi));
            lo = _mm256_add_pd(lo, p_lo);
            hi = _mm256_add_pd(hi, p_hi);
        }
        _mm_storeu_ps(y + k, _mm256_cvtpd_ps(lo));
        _mm_storeu_ps(y + k + 4, _mm256_cvtpd_ps(hi));
    }
}

// 16 rows a step (two chains of additions in flight), 8 at the end.
VQ_TARGET_AVX512 void project_avx512(const float* rows_t, int d, int width, const double* centered,
                                     float* y) {
    for (int k = 0; k < width; k += 16) {
        const bool two = k + 8 < width;
        __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
        for (int j = 0; j < d; ++j) {
            const float* u = rows_t + static_cast<std::size_t>(j) * width + k;
            const __m512d c = _mm512_set1_pd(centered[j]);
            __m512d p_lo = _mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(u)), c);
            __m512d p_hi = two ? _mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(u + 8)), c) : c;
            asm("" : "+v"(p_lo), "+v"(p_hi));
            lo = _mm512_add_pd(lo, p_lo);
            hi = _mm512_add_pd(hi, p_hi);
        }
        _mm256_storeu_ps(y + k, _mm512_cvtpd_ps(lo));
        if (two) _mm256_storeu_ps(y + k + 8, _mm512_cvtpd_ps(hi));
    }
}
#endif

/// The SIMD projection of the CPU's kernel set, or null (the generic set: project_slots).
ProjectFn simd_projection() {
#ifdef VQ_X86_KERNELS
    return kernel_for_isa<ProjectFn>(nullptr, project_avx2, project_avx512);
#else
    return nullptr;
#endif
}

// Appends of this many tokens or more project through the transposed rows on AVX2 and AVX-512
// (made once a call: d x width floats, about as much work as one token's projection).
constexpr int kTransposeTokens = 16;

constexpr int kSpreads = static_cast<int>(std::size(kSpectralSpreads));

}  // namespace

void SpectralCodec::encode(const float* keys, int n, uint8_t* codes, float* scalars,
                           std::size_t /*scalar_stride*/) const {
    const int d = dim();
    const std::size_t slots = slots_.size();
    const int width = static_cast<int>((slots + 7) / 8 * 8);
    const ProjectFn project = simd_projection();
    std::vector<float> rows_t;
    if (project != nullptr && n >= kTransposeTokens) {
        rows_t.assign(static_cast<std::size_t>(d) * width, 0.0f);
        for (std::size_t k = 0; k < slots; ++k)
            for (int j = 0; j < d; ++j)
                rows_t[static_cast<std::size_t>(j) * width + k] =
                    basis_.basis[static_cast<std::size_t>(slots_[k].coord) * d + j];
    }
    std::vector<double> centered(d), ys(slots);
    std::vector<float> y(width);                  // y_r of each slot's direction r
    std::vector<uint8_t> cand(slots * kSpreads);  // [slot][spread] levels
    for (int t = 0; t < n; ++t) {
        const float* key = keys + static_cast<std::size_t>(t) * d;
        for (int j = 0; j < d; ++j) centered[j] = static_cast<double>(key[j]) - basis_.mean[j];
        if (rows_t.empty())
            project_slots(centered.data(), y.data());
        else
            project(rows_t.data(), d, width, centered.data(), y.data());
        // Whitened coordinates z_r = y_r / sigma_r, divided by their RMS over the coded ones.
        // y_r / sigma_r and sum_r w_r y_r^2 are the same at every spread: taken once.
        double ms = 0.0, wyy = 0.0;
        for (std::size_t k = 0; k < slots; ++k) {
            const int r = slots_[k].coord;
            ys[k] = y[k] / sigma_[r];
            ms += ys[k] * ys[k];
            const double w = basis_.query_moments[r];
            wyy += w * y[k] * y[k];
        }
        const double rms = slots_.empty() ? 0.0 : std::sqrt(ms / static_cast<double>(slots));
        // Every spread's four sums, each in slot order (as one spread at a time would add
        // them); the spreads side by side, so a slot's inputs are read once and the spreads'
        // level searches overlap. Without a positive RMS every z is 0: the first spread only.
        const int spreads = rms > 0.0 ? kSpreads : 1;
        double inv[kSpreads], yy0[kSpreads] = {}, y0y0[kSpreads] = {}, wyy0[kSpreads] = {},
                              wy0y0[kSpreads] = {};
        for (int f = 0; f < spreads; ++f)
            inv[f] = rms > 0.0 ? 1.0 / (rms * kSpectralSpreads[f]) : 0.0;
        for (std::size_t k = 0; k < slots; ++k) {
            const Slot& s = slots_[k];
            const ScalarCodebook& cb = *codebooks_[s.bits];
            const double sigma = sigma_[s.coord], w = basis_.query_moments[s.coord], yk = y[k];
            uint8_t* level = &cand[k * kSpreads];
            for (int f = 0; f < spreads; ++f) {
                level[f] = cb.quantize(static_cast<float>(ys[k] * inv[f]));  // ties: lower cell
                const double y0 = sigma * cb.centroids[level[f]];
                yy0[f] += yk * y0;
                y0y0[f] += y0 * y0;
                wyy0[f] += w * yk * y0;
                wy0y0[f] += w * y0 * y0;
            }
        }
        double best_err = INFINITY, best_scale = 0.0;
        int best = -1;  // none: no error below infinity; the levels then stay 0, as on the device
        for (int f = 0; f < spreads; ++f) {
            // Least-squares scale of the reconstruction s y0 against y (dropped coordinates
            // add nothing to either sum), judged by the query-weighted error.
            const double sc = y0y0[f] > 0.0 ? yy0[f] / y0y0[f] : 0.0;
            const double err = wyy - 2.0 * sc * wyy0[f] + sc * sc * wy0y0[f];
            if (err < best_err) {
                best_err = err;
                best_scale = sc;
                best = f;
            }
        }
        scalars[t] = static_cast<float>(best_scale);
        uint8_t* code = codes + static_cast<std::size_t>(t) * code_bytes_;
        std::fill(code, code + code_bytes_, uint8_t{0});
        if (best >= 0)
            for (std::size_t k = 0; k < slots; ++k)
                write_field(code, slots_[k].bit_offset, slots_[k].bits, cand[k * kSpreads + best]);
    }
}

void SpectralCodec::decode(const uint8_t* codes, const float* scalars,
                           std::size_t /*scalar_stride*/, int n, float* keys) const {
    const int d = dim();
    std::vector<float> yh(d);
    for (int t = 0; t < n; ++t) {
        const uint8_t* code = codes + static_cast<std::size_t>(t) * code_bytes_;
        const float sc = scalars[t];
        std::fill(yh.begin(), yh.end(), 0.0f);
        for (const Slot& s : slots_)
            yh[s.coord] = static_cast<float>(sc * sigma_[s.coord]) *
                          codebooks_[s.bits]->centroids[read_field(code, s.bit_offset, s.bits)];
        float* out = keys + static_cast<std::size_t>(t) * d;
        for (int j = 0; j < d; ++j) out[j] = basis_.mean[j];
        for (int r = 0; r < d; ++r) {
            if (yh[r] == 0.0f) continue;
            const float* u = &basis_.basis[static_cast<std::size_t>(r) * d];
            for (int j = 0; j < d; ++j) out[j] += yh[r] * u[j];
        }
    }
}

std::size_t SpectralCodec::query_state_size() const {
    return state_size_;
}

void SpectralCodec::prepare_query(const float* query, float* state) const {
    spectral_query_state(*this, query, state);
}

void SpectralCodec::score(const float* state, const uint8_t* codes, const float* scalars,
                          std::size_t /*scalar_stride*/, int n, float* scores) const {
    spectral_scores_reference(*this, state, 0, 1, codes, scalars, n, scores, 0);
}

void SpectralCodec::score_rows_at(const float* states, std::size_t state_stride, int rows,
                                  const uint8_t* codes, const float* scalars,
                                  std::size_t /*scalar_stride*/, int n, int /*pos0*/, float* scores,
                                  std::size_t score_stride) const {
    spectral_scores(*this, states, state_stride, rows, codes, scalars, n, scores, score_stride);
}

std::size_t SpectralCodec::parameter_bytes() const {
    std::size_t codebooks = 0;
    for (int b = 1; b <= 8; ++b)
        if (std::find(bits_.begin(), bits_.end(), b) != bits_.end())
            codebooks +=
                (gaussian_codebook(b).centroids.size() + gaussian_codebook(b).boundaries.size()) *
                sizeof(float);
    return (basis_.basis.size() + basis_.variances.size() + basis_.mean.size() +
            basis_.query_moments.size()) *
               sizeof(float) +
           sigma_.size() * sizeof(double) + bits_.size() * sizeof(int) +
           slots_.size() * sizeof(Slot) + groups_.size() * sizeof(Group) + codebooks;
}

}  // namespace veloxquant
