#include "methods/spectral.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "core/bitpack.h"
#include "core/lloyd_max.h"

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
    if (a.shape.size() != 3 || a.shape[1] != d + 2 || a.shape[2] != d)
        bad_rotations(where + " must have shape [kv_heads][" + std::to_string(d + 2) + "][" +
                      std::to_string(d) + "] for head_dim " + std::to_string(d));
    if (a.shape[0] <= head)
        bad_rotations(where + " has " + std::to_string(a.shape[0]) + " KV heads, none for head " +
                      std::to_string(head));
    const std::size_t per_head = static_cast<std::size_t>(d + 2) * d;
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
    b.mean.assign(p + static_cast<std::size_t>(d + 1) * d, p + per_head);
    for (int i = 0; i < d; ++i) {
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
      basis_(std::move(basis)) {
    if (d_eff < 1 || d_eff > d)
        throw std::invalid_argument("spectral: d_eff must be in 1.." + std::to_string(d) +
                                    ", got " + std::to_string(d_eff));
    const std::size_t du = static_cast<std::size_t>(d);
    if (basis_.basis.size() != du * du || basis_.variances.size() != du || basis_.mean.size() != du)
        throw std::invalid_argument(
            "spectral: basis must be [d][d], variances and mean [d] for d = " + std::to_string(d));
    double top = 0.0;
    for (float v : basis_.variances) top = std::max(top, static_cast<double>(v));
    if (!(top > 0.0)) throw std::invalid_argument("spectral: variances must not all be zero");
    sigma_.resize(du);
    for (int r = 0; r < d; ++r)
        sigma_[r] = std::sqrt(std::max(static_cast<double>(basis_.variances[r]), 1e-12 * top));

    const ScalarCodebook& sc = gaussian_codebook(signal_bits);
    signal_centroids_ = sc.centroids;
    signal_bounds_ = sc.boundaries;
    if (noise_bits > 0) {
        const ScalarCodebook& nc = gaussian_codebook(noise_bits);
        noise_centroids_ = nc.centroids;
        noise_bounds_ = nc.boundaries;
    }
    signal_bytes_ = packed_bytes(static_cast<std::size_t>(d_eff), signal_bits);
    noise_bytes_ =
        noise_bits > 0 ? packed_bytes(static_cast<std::size_t>(d - d_eff), noise_bits) : 0;

    std::size_t table_at = 1;  // state[0] = <q, mu>
    for (int k = 0; k < 2; ++k) {
        Run& run = runs_[k];
        run.first = k == 0 ? 0 : d_eff;
        run.count = k == 0 ? d_eff : d - d_eff;
        run.bits = k == 0 ? signal_bits : noise_bits;
        run.offset = k == 0 ? 0 : signal_bytes_;
        run.bytes = k == 0 ? signal_bytes_ : noise_bytes_;
        run.centroids = k == 0 ? &signal_centroids_ : &noise_centroids_;
        run.byte_tables = run.bits == 1 || run.bits == 2 || run.bits == 4 || run.bits == 8;
        run.table_offset = table_at;
        if (run.bits == 0 || run.count == 0)
            run.table_floats = 0;
        else if (run.byte_tables)
            run.table_floats = run.bytes * 256;
        else
            run.table_floats = static_cast<std::size_t>(run.count) << run.bits;
        table_at += run.table_floats;
    }
}

double SpectralCodec::nominal_bits_per_coordinate() const {
    const int d = dim();
    return (static_cast<double>(signal_bits_) * d_eff_ +
            static_cast<double>(noise_bits_) * (d - d_eff_) + 32.0) /
           d;
}

void SpectralCodec::project(const float* key, double* y) const {
    const int d = dim();
    for (int r = 0; r < d; ++r) {
        const float* u = &basis_.basis[static_cast<std::size_t>(r) * d];
        double acc = 0.0;
        for (int j = 0; j < d; ++j)
            acc += static_cast<double>(u[j]) * (static_cast<double>(key[j]) - basis_.mean[j]);
        y[r] = acc;
    }
}

void SpectralCodec::encode(const float* keys, int n, uint8_t* codes, float* scalars,
                           std::size_t /*scalar_stride*/) const {
    const int d = dim();
    const int coded = noise_bits_ > 0 ? d : d_eff_;  // coordinates that get an index
    std::vector<double> y(d);
    std::vector<uint8_t> idx(d, 0);
    for (int t = 0; t < n; ++t) {
        project(keys + static_cast<std::size_t>(t) * d, y.data());
        // Whitened coordinates z_r = y_r / sigma_r, divided by their RMS over the coded ones.
        double ms = 0.0;
        for (int r = 0; r < coded; ++r) ms += (y[r] / sigma_[r]) * (y[r] / sigma_[r]);
        const double rms = std::sqrt(ms / coded);
        const double inv = rms > 0.0 ? 1.0 / rms : 0.0;
        double yy0 = 0.0, y0y0 = 0.0;
        for (int r = 0; r < coded; ++r) {
            const bool sig = r < d_eff_;
            const float z = static_cast<float>(y[r] / sigma_[r] * inv);
            const std::vector<float>& b = sig ? signal_bounds_ : noise_bounds_;
            // Nearest level: the number of cell boundaries below z (ties to the lower cell).
            idx[r] = static_cast<uint8_t>(std::lower_bound(b.begin(), b.end(), z) - b.begin());
            const double y0 = sigma_[r] * (sig ? signal_centroids_ : noise_centroids_)[idx[r]];
            yy0 += y[r] * y0;
            y0y0 += y0 * y0;
        }
        // Least-squares scale of the reconstruction s y0 against y (dropped coordinates add
        // nothing to either sum).
        scalars[t] = y0y0 > 0.0 ? static_cast<float>(yy0 / y0y0) : 0.0f;
        uint8_t* code = codes + static_cast<std::size_t>(t) * code_bytes();
        pack_bits(idx.data(), static_cast<std::size_t>(d_eff_), signal_bits_, code);
        if (noise_bits_ > 0)
            pack_bits(idx.data() + d_eff_, static_cast<std::size_t>(d - d_eff_), noise_bits_,
                      code + signal_bytes_);
    }
}

void SpectralCodec::decode(const uint8_t* codes, const float* scalars,
                           std::size_t /*scalar_stride*/, int n, float* keys) const {
    const int d = dim();
    std::vector<uint8_t> idx(d, 0);
    std::vector<float> yh(d);
    for (int t = 0; t < n; ++t) {
        const uint8_t* code = codes + static_cast<std::size_t>(t) * code_bytes();
        const float s = scalars[t];
        for (const Run& run : runs_) {
            if (run.bits == 0) {
                for (int j = 0; j < run.count; ++j) yh[run.first + j] = 0.0f;
                continue;
            }
            unpack_bits(code + run.offset, static_cast<std::size_t>(run.count), run.bits,
                        idx.data());
            for (int j = 0; j < run.count; ++j)
                yh[run.first + j] =
                    static_cast<float>(s * sigma_[run.first + j]) * (*run.centroids)[idx[j]];
        }
        float* out = keys + static_cast<std::size_t>(t) * d;
        for (int j = 0; j < d; ++j) out[j] = basis_.mean[j];
        for (int r = 0; r < d; ++r) {
            const float* u = &basis_.basis[static_cast<std::size_t>(r) * d];
            for (int j = 0; j < d; ++j) out[j] += yh[r] * u[j];
        }
    }
}

std::size_t SpectralCodec::query_state_size() const {
    return runs_[1].table_offset + runs_[1].table_floats;
}

void SpectralCodec::prepare_query(const float* query, float* state) const {
    const int d = dim();
    // <q, mu + U^T y_hat> = <q, mu> + sum_r (U q)_r y_hat_r, y_hat_r = s sigma_r C[i_r].
    double qmu = 0.0;
    for (int j = 0; j < d; ++j) qmu += static_cast<double>(query[j]) * basis_.mean[j];
    state[0] = static_cast<float>(qmu);
    std::vector<double> w(d);
    for (int r = 0; r < d; ++r) {
        const float* u = &basis_.basis[static_cast<std::size_t>(r) * d];
        double acc = 0.0;
        for (int j = 0; j < d; ++j) acc += static_cast<double>(u[j]) * query[j];
        w[r] = acc * sigma_[r];
    }
    for (const Run& run : runs_) {
        if (run.table_floats == 0) continue;
        float* table = state + run.table_offset;
        const std::vector<float>& c = *run.centroids;
        const int levels = 1 << run.bits;
        if (!run.byte_tables) {
            for (int j = 0; j < run.count; ++j)
                for (int v = 0; v < levels; ++v)
                    table[(static_cast<std::size_t>(j) << run.bits) + v] =
                        static_cast<float>(w[run.first + j] * c[v]);
            continue;
        }
        // Byte g holds coordinates g G .. g G + G - 1 of the run (G = 8 / bits), low bits
        // first; padding past the run's end has weight 0.
        const int group = 8 / run.bits;
        const unsigned mask = static_cast<unsigned>(levels - 1);
        for (std::size_t g = 0; g < run.bytes; ++g) {
            for (unsigned v = 0; v < 256; ++v) {
                double acc = 0.0;
                for (int k = 0; k < group; ++k) {
                    const int j = static_cast<int>(g) * group + k;
                    if (j >= run.count) break;
                    acc += w[run.first + j] * c[(v >> (k * run.bits)) & mask];
                }
                table[g * 256 + v] = static_cast<float>(acc);
            }
        }
    }
}

void SpectralCodec::score(const float* state, const uint8_t* codes, const float* scalars,
                          std::size_t /*scalar_stride*/, int n, float* scores) const {
    const float qmu = state[0];
    const std::size_t cb = code_bytes();
    for (int t = 0; t < n; ++t) {
        const uint8_t* code = codes + static_cast<std::size_t>(t) * cb;
        float a0 = 0.0f, a1 = 0.0f;  // two add chains
        for (const Run& run : runs_) {
            if (run.table_floats == 0) continue;
            const float* table = state + run.table_offset;
            const uint8_t* p = code + run.offset;
            if (run.byte_tables) {
                std::size_t g = 0;
                for (; g + 2 <= run.bytes; g += 2) {
                    a0 += table[g * 256 + p[g]];
                    a1 += table[(g + 1) * 256 + p[g + 1]];
                }
                if (g < run.bytes) a0 += table[g * 256 + p[g]];
            } else {
                for (int j = 0; j < run.count; ++j)
                    a0 += table[(static_cast<std::size_t>(j) << run.bits) +
                                read_packed(p, j, run.bits)];
            }
        }
        scores[t] = qmu + scalars[t] * (a0 + a1);
    }
}

std::size_t SpectralCodec::parameter_bytes() const {
    return (basis_.basis.size() + basis_.variances.size() + basis_.mean.size()) * sizeof(float) +
           sigma_.size() * sizeof(double) +
           (signal_centroids_.size() + signal_bounds_.size() + noise_centroids_.size() +
            noise_bounds_.size()) *
               sizeof(float);
}

}  // namespace veloxquant
