// spectral as a device codec. Mirrors SpectralCodec (methods/spectral.h): y = U (k - mu) on the
// coded directions, z_r = y_r / sigma_r; for each spread f the nearest N(0, 1) Lloyd-Max levels
// of z_r / (f RMS(z)), the least-squares scale s of y_hat = s sigma_r C_{b_r}[i_r], and the f of
// lowest query-weighted error sum_r w_r (y_r - y_hat_r)^2 is kept. Score on the codes:
//     <q, k_hat> = <q, mu> + s sum_r ((U q)_r sigma_r) C_{b_r}[i_r].
// The code stream holds the coded directions by descending width (ascending r among equals), so
// its fields form runs of equal width, 8 bits down to 1: the loops below walk those runs.
#pragma once

#include "device_codecs/device_common.h"

namespace veloxquant {
class KeyCodec;
}

namespace veloxquant::dev {

struct SpectralDevice {
    /// Widest field of the allocation (SpectralCodec codes 0..8 bits per direction).
    static constexpr int kMaxBits = 8;
    /// Centroids of the N(0, 1) codebooks of widths 1..8, back to back (width b starts at
    /// 2^b - 2; its boundaries at 2^b - b - 1 of theirs).
    static constexpr int kCodebookFloats = (2 << kMaxBits) - 2;
    VQ_HD static int centroid_offset(int bits) { return (1 << bits) - 2; }
    VQ_HD static int boundary_offset(int bits) { return (1 << bits) - bits - 1; }

    struct Params {
        int d = 0;
        int num_slots = 0;  ///< coded directions (b_r >= 1), in stream order
        int code_bytes = 0;
        int num_spreads = 0;
        int slots_of_width[kMaxBits + 1] = {};  ///< run lengths of the stream, by width
        const float* basis = nullptr;           ///< [d][d], row r = direction r
        const float* mean = nullptr;            ///< [d]
        const int* slot_coord = nullptr;        ///< [num_slots] direction r of each slot
        const double* slot_sigma = nullptr;     ///< [num_slots] sigma_r
        const float* slot_weight = nullptr;     ///< [num_slots] query moment w_r
        const double* spreads = nullptr;        ///< [num_spreads] kSpectralSpreads
        const float* centroids = nullptr;       ///< [kCodebookFloats]
        const float* boundaries = nullptr;      ///< [kCodebookFloats - kMaxBits]
        void rebase(const uint8_t* base) {
            dev::rebase(basis, base);
            dev::rebase(mean, base);
            dev::rebase(slot_coord, base);
            dev::rebase(slot_sigma, base);
            dev::rebase(slot_weight, base);
            dev::rebase(spreads, base);
            dev::rebase(centroids, base);
            dev::rebase(boundaries, base);
        }
    };

    /// Host: from a SpectralCodec (throws std::invalid_argument for another codec or d > 256).
    static Params build(const KeyCodec& cpu, ParamArena& arena);

    VQ_HD static int code_bytes(const Params& p) { return p.code_bytes; }
    VQ_HD static int num_scalars(const Params&) { return 1; }
    /// <q, mu>, (U q)_r sigma_r of each slot, then the codebooks (so lookups hit shared memory).
    VQ_HD static int state_floats(const Params& p) { return 1 + p.num_slots; }
    /// The N(0, 1) codebooks of every width, one lookup per coded direction.
    VQ_HD static int table_floats(const Params&) { return kCodebookFloats; }
    VQ_HD static const float*& table(Params& p) { return p.centroids; }

    /// SpectralCodec::encode for one token, in its operation order (double sums over the slots
    /// in stream order, y_r kept as a float as the CPU keeps it), so codes and scale are
    /// byte-identical. Its stack stays within the default 1 KB a thread (y and nothing else):
    /// the driver reserves any more for every thread the GPU can hold, and keeps it (at 2 KB of
    /// doubles and two level arrays it held 404 MiB); the best spread's levels are found again.
    VQ_HD static void encode(const Params& p, const float* key, int /*pos*/, uint8_t* code,
                             float* scalars, int /*stride*/) {
        const int d = p.d, n = p.num_slots;
        float y[kMaxDim];  // y_r of slot k's direction
        for (int k = 0; k < n; ++k) {
            const float* u = p.basis + static_cast<std::size_t>(p.slot_coord[k]) * d;
            double acc = 0.0;
            for (int j = 0; j < d; ++j)
                acc += static_cast<double>(u[j]) * (static_cast<double>(key[j]) - p.mean[j]);
            y[k] = static_cast<float>(acc);
        }
        double ms = 0.0;
        for (int k = 0; k < n; ++k) ms += (y[k] / p.slot_sigma[k]) * (y[k] / p.slot_sigma[k]);
        const double rms = sqrt(ms / static_cast<double>(n));

        double best_err = INFINITY, best_scale = 0.0;
        int best_f = -1;  // none: no error below infinity (NaN keys); levels then stay 0
        for (int f = 0; f < p.num_spreads; ++f) {
            double sc, err;
            fit_spread(
                p, y, [&](int k, int b) { return level(p, y[k] / p.slot_sigma[k], rms, f, b); },
                &sc, &err);
            if (err < best_err) {
                best_err = err;
                best_scale = sc;
                best_f = f;
            }
            if (!(rms > 0.0)) break;
        }
        scalars[0] = static_cast<float>(best_scale);
        zero_bytes(code, p.code_bytes);
        if (best_f < 0) return;
        for (int b = kMaxBits, k = 0, bit = 0; b >= 1; --b)
            for (const int end = k + p.slots_of_width[b]; k < end; ++k, bit += b)
                or_field(code, bit, b, level(p, y[k] / p.slot_sigma[k], rms, best_f, b));
    }

    /// The level of a slot of width b at spread f, from ys = y_r / sigma_r: the number of cell
    /// boundaries below z = ys / (rms f) (ties to the lower cell; z = 0 where rms is not > 0).
    VQ_HD static int level(const Params& p, double ys, double rms, int f, int b) {
        const double inv = rms > 0.0 ? 1.0 / (rms * p.spreads[f]) : 0.0;
        const float z = static_cast<float>(ys * inv);
        return quantize_sorted(p.boundaries + boundary_offset(b), (1 << b) - 1, z);
    }

    /// The least-squares scale of one spread's levels (slot k's, of width b, level_of(k, b)) and
    /// its query-weighted error, each sum taken over the slots in stream order (SpectralCodec's).
    template <class LevelOf>
    VQ_HD static void fit_spread(const Params& p, const float* y, LevelOf level_of, double* scale,
                                 double* err) {
        double yy0 = 0.0, y0y0 = 0.0, wyy = 0.0, wyy0 = 0.0, wy0y0 = 0.0;
        for (int b = kMaxBits, k = 0; b >= 1; --b) {
            const float* c = p.centroids + centroid_offset(b);
            for (const int end = k + p.slots_of_width[b]; k < end; ++k) {
                const double y0 = p.slot_sigma[k] * c[level_of(k, b)];
                const double w = p.slot_weight[k];
                yy0 += y[k] * y0;
                y0y0 += y0 * y0;
                wyy += w * y[k] * y[k];
                wyy0 += w * y[k] * y0;
                wy0y0 += w * y0 * y0;
            }
        }
        const double sc = y0y0 > 0.0 ? yy0 / y0y0 : 0.0;
        *scale = sc;
        *err = wyy - 2.0 * sc * wyy0 + sc * sc * wy0y0;
    }

    /// k_hat = mu + sum_r y_hat_r u_r over ascending r (SpectralCodec::decode's order).
    VQ_HD static void decode(const Params& p, const uint8_t* code, const float* scalars,
                             int /*stride*/, int /*pos*/, float* key) {
        const int d = p.d;
        const float sc = scalars[0];
        float y_hat[kMaxDim];
        for (int r = 0; r < d; ++r) y_hat[r] = 0.0f;
        for (int b = kMaxBits, k = 0, bit = 0; b >= 1; --b) {
            const float* c = p.centroids + centroid_offset(b);
            for (const int end = k + p.slots_of_width[b]; k < end; ++k, bit += b)
                y_hat[p.slot_coord[k]] =
                    static_cast<float>(sc * p.slot_sigma[k]) * c[read_field(code, bit, b)];
        }
        for (int j = 0; j < d; ++j) key[j] = p.mean[j];
        for (int r = 0; r < d; ++r) {
            if (y_hat[r] == 0.0f) continue;
            const float* u = p.basis + static_cast<std::size_t>(r) * d;
            for (int j = 0; j < d; ++j) key[j] += y_hat[r] * u[j];
        }
    }

    VQ_HD static void prepare(const Params& p, const float* query, float* state) {
        const int d = p.d, n = p.num_slots;
        double qmu = 0.0;
        for (int j = 0; j < d; ++j) qmu += static_cast<double>(query[j]) * p.mean[j];
        state[0] = static_cast<float>(qmu);
        for (int k = 0; k < n; ++k) {
            const float* u = p.basis + static_cast<std::size_t>(p.slot_coord[k]) * d;
            double acc = 0.0;
            for (int j = 0; j < d; ++j) acc += static_cast<double>(u[j]) * query[j];
            state[1 + k] = static_cast<float>(acc * p.slot_sigma[k]);
        }
    }

    // The feature form (device_common.h): slot k's centroid C_{b_k}[i_k] against state entry
    // 1 + k, factor the stored scale, plus the state's <q, mu> (entry 0).
    static constexpr int kFeatureGroup = 8;
    VQ_HD static int feature_offset(const Params&) { return 1; }
    VQ_HD static int feature_count(const Params& p) { return p.num_slots; }
    VQ_HD static bool features_usable(const Params&) { return true; }
    VQ_HD static float feature_factor(const float* scalars) { return scalars[0]; }
    VQ_HD static int extra_entry(const Params&, const uint8_t*) { return 0; }
    VQ_HD static void features(const Params& p, const uint8_t* code, int /*pos*/, int g, float* f) {
        // Skip the runs before slot 8 g: their widths and lengths fix its bit.
        int k = 0, bit = 0, b = kMaxBits;
        for (; b >= 1 && k + p.slots_of_width[b] <= 8 * g; --b) {
            k += p.slots_of_width[b];
            bit += b * p.slots_of_width[b];
        }
        bit += b * (8 * g - k);
        k = 8 * g;
        FieldReader fields(code, code + code_bytes(p), bit);
        for (int i = 0; i < 8 && k < p.num_slots; ++i, ++k) {
            while (k >= run_end(p, b)) --b;  // the run of slot k
            f[i] = p.centroids[centroid_offset(b) + fields.next(b)];
        }
    }

    /// One codebook lookup per coded direction, its weight read for every row.
    template <int R>
    VQ_HD static void score(const Params& p, const float* state, const uint8_t* code,
                            const float* scalars, int /*stride*/, int /*pos*/, float (&out)[R]) {
        float acc[R] = {};
        FieldReader fields(code, code + code_bytes(p));
        for (int b = kMaxBits, k = 0; b >= 1; --b) {
            const float* c = p.centroids + centroid_offset(b);
            for (const int end = k + p.slots_of_width[b]; k < end; ++k)
                fma_rows<R>(acc, c[fields.next(b)], state + (1 + k) * R);
        }
        float mean[R];  // <q, mu>
        load_rows<R>(state, mean);
        for (int r = 0; r < R; ++r) out[r] = mean[r] + scalars[0] * acc[r];
    }

private:
    /// One past the last slot of the run of width b (the runs go from width kMaxBits down).
    VQ_HD static int run_end(const Params& p, int b) {
        int end = 0;
        for (int w = kMaxBits; w >= b; --w) end += p.slots_of_width[w];
        return end;
    }
};

}  // namespace veloxquant::dev
