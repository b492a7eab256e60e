// Team encoders (team_encode.cuh) of spectral and rabitq keys. Each mirrors the one-thread
// encoder of its device codec (src/device_codecs/) operation for operation; what that encoder
// sums in order, one thread sums here in the same order.
#pragma once

#include "cuda/team_encode.cuh"
#include "device_codecs/rabitq_device.h"
#include "device_codecs/spectral_device.h"

namespace veloxquant::cuda::team {

/// SpectralDevice::encode: one slot's y_r (a sequential dot product) per thread; thread 0 sums
/// the mean square; then the spreads kChunk at a time: the levels of every (slot, spread) across
/// the team, one spread's five sums in slot order per lane of warp 0, and the keep-first choice
/// of the lowest error in spread order (by every thread, on the lanes' results).
template <>
struct TeamEncoder<dev::SpectralDevice> {
    static constexpr bool kAvailable = true;
    static constexpr int kMaxCodeBytes = kCommonMaxCodeBytes;  // at most 8 bits per direction
    using Spectral = dev::SpectralDevice;
    static constexpr int kChunk = 16;  // spreads per round, at most 32 (one lane each)

    /// Width and stream bit offset of slot k (runs of descending width).
    __device__ static void slot_field(const Spectral::Params& p, int k, int* bits, int* bit) {
        int b = Spectral::kMaxBits, first = 0, at = 0;
        while (k >= first + p.slots_of_width[b]) {
            first += p.slots_of_width[b];
            at += p.slots_of_width[b] * b;
            --b;
        }
        *bits = b;
        *bit = at + (k - first) * b;
    }

    __device__ static void encode(const Spectral::Params& p, const float* key, int, uint8_t* code,
                                  float* scalars, int) {
        __shared__ double kc[dev::kMaxDim];  // key - mean
        __shared__ float y[dev::kMaxDim];    // as the one-thread encoder keeps y_r
        __shared__ double ys[dev::kMaxDim];
        __shared__ uint8_t slot_bits[dev::kMaxDim];
        __shared__ uint8_t cand[dev::kMaxDim * kChunk];  // [slot][spread - f0]
        __shared__ double err_of[kChunk], scale_of[kChunk];
        __shared__ double rms_shared;
        __shared__ uint32_t words[(kMaxCodeBytes + 3) / 4];
        const int d = p.d, n = p.num_slots;
        for (int j = rank(); j < d; j += kTeam) kc[j] = static_cast<double>(key[j]) - p.mean[j];
        sync();
        for (int k = rank(); k < n; k += kTeam) {
            const float* u = p.basis + static_cast<std::size_t>(p.slot_coord[k]) * d;
            double acc = 0.0;
            for (int j = 0; j < d; ++j) acc += static_cast<double>(u[j]) * kc[j];
            y[k] = static_cast<float>(acc);
            ys[k] = y[k] / p.slot_sigma[k];
            int b, bit;
            slot_field(p, k, &b, &bit);
            slot_bits[k] = static_cast<uint8_t>(b);
        }
        sync();
        if (rank() == 0) {
            double ms = 0.0;
            for (int k = 0; k < n; ++k) ms += ys[k] * ys[k];
            rms_shared = sqrt(ms / static_cast<double>(n));
        }
        sync();
        const double rms = rms_shared;
        // The encoder stops after the first spread unless rms > 0.
        const int spreads = rms > 0.0 ? p.num_spreads : min(p.num_spreads, 1);
        double best_err = INFINITY, best_scale = 0.0;
        int best_f = -1;  // none: no error below infinity (NaN keys); levels then stay 0
        for (int f0 = 0; f0 < spreads; f0 += kChunk) {
            const int nf = min(kChunk, spreads - f0);
            for (int i = rank(); i < n * nf; i += kTeam) {
                const int k = i / nf, f = i % nf;
                const int idx = Spectral::level(p, ys[k], rms, f0 + f, slot_bits[k]);
                cand[k * kChunk + f] = static_cast<uint8_t>(idx);
            }
            sync();
            if (rank() < nf) {
                const uint8_t* levels = cand + rank();  // [slot * kChunk]
                Spectral::fit_spread(
                    p, y, [levels](int k, int) { return levels[k * kChunk]; }, &scale_of[rank()],
                    &err_of[rank()]);
            }
            sync();
            for (int f = 0; f < nf; ++f) {
                if (err_of[f] < best_err) {
                    best_err = err_of[f];
                    best_scale = scale_of[f];
                    best_f = f0 + f;
                }
            }
        }
        if (rank() == 0) scalars[0] = static_cast<float>(best_scale);
        const SharedBits stream{words};
        stream.zero(p.code_bytes);
        if (best_f >= 0) {
            for (int k = rank(); k < n; k += kTeam) {
                int b, bit;
                slot_field(p, k, &b, &bit);
                stream.put(bit, b,
                           static_cast<uint32_t>(Spectral::level(p, ys[k], rms, best_f, b)));
            }
        }
        stream.store(code, p.code_bytes);
    }
};

/// RaBitQDevice::encode: the rotation, the nearest centroid (squared_distance per centroid
/// across the team), the residual's sums in thread 0 and thread 32, the Extended-RaBitQ steps
/// (search_steps), then the levels across the team and <x_bar, e> in thread 0.
template <>
struct TeamEncoder<dev::RaBitQDevice> {
    static constexpr bool kAvailable = true;
    static constexpr int kMaxCodeBytes = kCommonMaxCodeBytes;  // 2 id bytes, 8-bit levels
    using RaBitQ = dev::RaBitQDevice;
    /// Largest d (M - 1) searched by the team; wider searches run in thread 0.
    static constexpr int kMaxEvents = 2048;
    static constexpr uint16_t kNoEvent = 0xffff;  // padding tag, after every j << 8 | s

    /// The team's sorted events, or (for wider searches) thread 0's heap: one shared region.
    union SearchSpace {
        struct {
            double t[kMaxEvents];
            uint16_t tag[kMaxEvents];  // j << 8 | s, or kNoEvent
        } events;
        dev::rabitq_detail::CriticalValueHeap heap;
    };

    /// dev::nearest_centroid: the first least distance; NaN distances are never taken, except
    /// centroid 0's, which then stays (keyed -inf here: no distance is below it).
    __device__ static int nearest(const RaBitQ::Params& p, const float* x) {
        __shared__ float warp_v[kWarpsPerTeam];
        __shared__ int warp_i[kWarpsPerTeam];
        __shared__ int result;
        float v = 0.0f;
        int i = -1;
        for (int c = rank(); c < p.clusters; c += kTeam) {
            const float* row = p.centroids + static_cast<std::size_t>(c) * p.d;
            float dd = veloxquant::squared_distance(x, row, p.d);
            if (dd != dd) {
                if (c != 0) continue;
                dd = -INFINITY;
            }
            if (i < 0 || dd < v) {  // c ascends in this thread
                v = dd;
                i = c;
            }
        }
        // Least (distance, index) of the candidates (distinct indices, no NaN: a total order).
        auto take = [&](float v2, int i2) {
            if (i2 >= 0 && (i < 0 || v2 < v || (v2 == v && i2 < i))) {
                v = v2;
                i = i2;
            }
        };
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float v2 = __shfl_xor_sync(kFull, v, offset);
            const int i2 = __shfl_xor_sync(kFull, i, offset);
            take(v2, i2);
        }
        if (lane() == 0) {
            warp_v[warp()] = v;
            warp_i[warp()] = i;
        }
        sync();
        if (rank() == 0) {
            for (int w = 1; w < kWarpsPerTeam; ++w) take(warp_v[w], warp_i[w]);
            result = i < 0 ? 0 : i;
        }
        sync();
        return result;
    }

    /// rabitq_detail::extended_rabitq_steps for d (m - 1) <= kMaxEvents. Its heap yields every
    /// event (t = s / |e_j|, s = 1.. while critical_value) in (t, j) order; here they are listed
    /// across the team, bitonic-sorted by (t, j << 8 | s), and thread 0 scans them with its
    /// double updates (steps[j] = s - 1 before event s). The best prefix is replayed per j.
    __device__ static void search_steps(const double* e, int d, int m, double abs_sum,
                                        uint8_t* steps, SearchSpace& space) {
        double* ev_t = space.events.t;
        uint16_t* ev_tag = space.events.tag;
        __shared__ double best_t;
        __shared__ int best_j, count;
        const double t_max = (m - 0.5) * d / abs_sum * (1.0 + 1e-9);
        const int slots = d * (m - 1);  // slot j (m - 1) + s - 1: event s of coordinate j
        int n = 1;
        while (n < slots) n <<= 1;
        if (rank() == 0) count = 0;
        sync();
        int mine = 0;
        for (int i = rank(); i < n; i += kTeam) {
            double t = INFINITY;
            uint16_t tag = kNoEvent;
            if (i < slots) {
                const int j = i / (m - 1), s = i % (m - 1) + 1;
                if (dev::rabitq_detail::critical_value(s, fabs(e[j]), m, t_max, &t)) {
                    tag = static_cast<uint16_t>(j << 8 | s);
                    ++mine;
                }
            }
            ev_t[i] = t;
            ev_tag[i] = tag;
        }
        if (mine > 0) atomicAdd(&count, mine);
        sync();
        auto before = [&](int a, int b) {
            return ev_t[a] < ev_t[b] || (ev_t[a] == ev_t[b] && ev_tag[a] < ev_tag[b]);
        };
        for (int k = 2; k <= n; k <<= 1) {
            for (int h = k >> 1; h > 0; h >>= 1) {
                for (int i = rank(); i < n / 2; i += kTeam) {
                    const int a = 2 * i - (i & (h - 1)), b = a + h;
                    if ((a & k) == 0 ? before(b, a) : before(a, b)) {
                        const double t = ev_t[a];
                        const uint16_t tag = ev_tag[a];
                        ev_t[a] = ev_t[b];
                        ev_tag[a] = ev_tag[b];
                        ev_t[b] = t;
                        ev_tag[b] = tag;
                    }
                }
                sync();
            }
        }
        if (rank() == 0) {
            double ip = 0.5 * abs_sum;  // <s + 1/2, |e|>
            double nn = 0.25 * d;       // ||s + 1/2||^2
            double best = ip * ip / nn;
            int at = -1;  // the best prefix ends with event at
            for (int i = 0; i < count; ++i) {
                const int tag = ev_tag[i];
                ip += fabs(e[tag >> 8]);
                nn += 2.0 * ((tag & 0xff) - 1) + 2.0;
                if (ip * ip > best * nn) {
                    best = ip * ip / nn;
                    at = i;
                }
            }
            best_t = at >= 0 ? ev_t[at] : 0.0;
            best_j = at >= 0 ? ev_tag[at] >> 8 : -1;
        }
        sync();
        for (int j = rank(); j < d; j += kTeam)
            steps[j] = static_cast<uint8_t>(
                dev::rabitq_detail::steps_in_prefix(fabs(e[j]), j, m, t_max, best_t, best_j));
        sync();
    }

    __device__ static void encode(const RaBitQ::Params& p, const float* key, int, uint8_t* code,
                                  float* scalars, int) {
        __shared__ float x[dev::kMaxDim];
        __shared__ double e[dev::kMaxDim];
        __shared__ uint8_t steps[dev::kMaxDim];
        __shared__ double sums[2];  // norm2, abs_sum
        __shared__ uint32_t words[(kMaxCodeBytes + 3) / 4];
        __shared__ SearchSpace space;
        const int d = p.d, bytes = RaBitQ::code_bytes(p);
        rotate(p.rotation, key, x);
        const int cid = nearest(p, x);
        const float* c = p.centroids + static_cast<std::size_t>(cid) * d;
        for (int j = rank(); j < d; j += kTeam) e[j] = static_cast<double>(x[j]) - c[j];
        sync();
        if (rank() == 0) {
            double norm2 = 0.0;
            for (int j = 0; j < d; ++j) norm2 += e[j] * e[j];
            sums[0] = norm2;
        } else if (rank() == 32) {
            double abs_sum = 0.0;
            for (int j = 0; j < d; ++j) abs_sum += fabs(e[j]);
            sums[1] = abs_sum;
        }
        sync();
        const double norm2 = sums[0], abs_sum = sums[1];
        const int m = 1 << (p.bits - 1);
        if (norm2 > 0.0 && m > 1 && d * (m - 1) <= kMaxEvents) {
            search_steps(e, d, m, abs_sum, steps, space);
        } else if (norm2 > 0.0 && m > 1) {
            if (rank() == 0)  // the heap in shared memory, not on rank 0's stack
                dev::rabitq_detail::extended_rabitq_steps(e, d, m, abs_sum, steps, space.heap);
            sync();
        } else {
            for (int j = rank(); j < d; j += kTeam) steps[j] = 0;
            sync();
        }
        const SharedBits stream{words};
        stream.zero(bytes);
        if (rank() == 0) {
            stream.put(0, 8, static_cast<uint32_t>(cid & 0xff));
            if (p.id_bytes == 2) stream.put(8, 8, static_cast<uint32_t>(cid >> 8));
            double xe = 0.0;  // <x_bar, e>
            for (int j = 0; j < d; ++j) {
                const int s = steps[j];
                xe += (s + 0.5) * fabs(e[j]);
            }
            // e = 0 (a key on its centroid) decodes to c exactly.
            scalars[0] = norm2 > 0.0 ? static_cast<float>(norm2 / xe) : 0.0f;
        }
        for (int j = rank(); j < d; j += kTeam) {
            const int s = steps[j];
            const int level = e[j] >= 0.0 ? m + s : m - 1 - s;
            stream.put(8 * p.id_bytes + j * p.bits, p.bits, static_cast<uint32_t>(level));
        }
        stream.store(code, bytes);
    }
};

}  // namespace veloxquant::cuda::team
