// rabitq as a device codec, mirroring RaBitQCodec (methods/rabitq.h) with its centroids fixed:
// the host trains the CPU codec (k-means on the first append, or calibrated centroids) before
// build(). A token is rotated, x = P k, assigned to its nearest centroid c, and its residual
// e = x - c is coded as B-bit levels u (grid point x_bar_j = u_j - (2^B - 1)/2) plus one float
// f = ||e||^2 / <x_bar, e>; score = <q', c> + f <x_bar, q'>, decode = P^T (c + f x_bar).
// Code bytes: the cluster id (1 byte, or 2 little-endian bytes for more than 256 clusters), then
// the packed levels; exactly the CPU codec's bytes.
#pragma once

#include "core/kmeans.h"
#include "device_codecs/device_common.h"

namespace veloxquant {
class KeyCodec;
}

namespace veloxquant::dev {

namespace rabitq_detail {

/// The critical value t = s / |e_j| at which coordinate j's step count reaches s, if the CPU
/// codec lists it (s < M and s <= t_max |e_j|, rabitq.cpp's critical_values).
VQ_HD bool critical_value(int s, double abs_e, int m, double t_max, double* t) {
    if (s >= m || !(s <= t_max * abs_e)) return false;
    *t = s / abs_e;
    return true;
}

/// Coordinates keyed by their next critical value, ordered by (t, j): a binary min-heap yields
/// the events in the CPU codec's sorted order without storing all d (M - 1) of them. 2.5 KB: a
/// team encoder keeps it in shared memory (no initializer, so it may be __shared__).
struct CriticalValueHeap {
    double t[kMaxDim];
    uint16_t j[kMaxDim];
    int size;

    VQ_HD bool before(int a, int b) const { return t[a] < t[b] || (t[a] == t[b] && j[a] < j[b]); }
    VQ_HD void swap_slots(int a, int b) {
        const double ta = t[a];
        const uint16_t ja = j[a];
        t[a] = t[b];
        j[a] = j[b];
        t[b] = ta;
        j[b] = ja;
    }
    VQ_HD void push(double tv, int jv) {
        int i = size++;
        t[i] = tv;
        j[i] = static_cast<uint16_t>(jv);
        while (i > 0 && before(i, (i - 1) / 2)) {
            swap_slots(i, (i - 1) / 2);
            i = (i - 1) / 2;
        }
    }
    VQ_HD void sift_down() {
        int i = 0;
        for (;;) {
            const int l = 2 * i + 1, r = l + 1;
            int m = i;
            if (l < size && before(l, m)) m = l;
            if (r < size && before(r, m)) m = r;
            if (m == i) return;
            swap_slots(i, m);
            i = m;
        }
    }
    /// Replaces the minimum by coordinate jv's next critical value tv.
    VQ_HD void replace_top(double tv, int jv) {
        t[0] = tv;
        j[0] = static_cast<uint16_t>(jv);
        sift_down();
    }
    VQ_HD void pop() {
        --size;
        t[0] = t[size];
        j[0] = j[size];
        sift_down();
    }
};

/// Coordinate j's step count after the events (t, i) <= (best_t, best_j), in (t, i) order (0 if
/// best_j < 0: no event kept).
VQ_HD int steps_in_prefix(double abs_e, int j, int m, double t_max, double best_t, int best_j) {
    int s = 0;
    double t;
    while (best_j >= 0 && critical_value(s + 1, abs_e, m, t_max, &t) &&
           (t < best_t || (t == best_t && j <= best_j)))
        ++s;
    return s;
}

/// Extended-RaBitQ code search (arXiv 2409.09913 §3.2) for a nonzero residual e and M > 1, as
/// rabitq.cpp's quantize: steps s_j in 0..M-1 (x_bar_j = sign(e_j) (s_j + 1/2)) maximising
/// <x_bar, e>^2 / ||x_bar||^2. Raising t from 0, s_j steps up at t = (s_j + 1)/|e_j|; the
/// events are visited in (t, j) order, the best prefix kept. Same double operations as the CPU.
VQ_HD void extended_rabitq_steps(const double* e, int d, int m, double abs_sum, uint8_t* steps,
                                 CriticalValueHeap& heap) {
    // The optimum's t is at most (M - 1/2) d / ||e||_1 (see rabitq.cpp).
    const double t_max = (m - 0.5) * d / abs_sum * (1.0 + 1e-9);
    heap.size = 0;
    for (int j = 0; j < d; ++j) {
        steps[j] = 0;
        double t;
        if (critical_value(1, fabs(e[j]), m, t_max, &t)) heap.push(t, j);
    }
    double ip = 0.5 * abs_sum;  // <s + 1/2, |e|>
    double nn = 0.25 * d;       // ||s + 1/2||^2
    double best = ip * ip / nn;
    double best_t = 0.0;  // the best prefix ends with event (best_t, best_j); none if best_j < 0
    int best_j = -1;
    while (heap.size > 0) {
        const double t = heap.t[0];
        const int j = heap.j[0];
        const double abs_e = fabs(e[j]);
        ip += abs_e;
        nn += 2.0 * steps[j] + 2.0;  // (s + 3/2)^2 - (s + 1/2)^2
        ++steps[j];
        if (ip * ip > best * nn) {
            best = ip * ip / nn;
            best_t = t;
            best_j = j;
        }
        double next;
        if (critical_value(steps[j] + 1, abs_e, m, t_max, &next))
            heap.replace_top(next, j);
        else
            heap.pop();
    }
    // Replay the best prefix: every event (t, j) <= (best_t, best_j).
    for (int j = 0; j < d; ++j)
        steps[j] = static_cast<uint8_t>(steps_in_prefix(fabs(e[j]), j, m, t_max, best_t, best_j));
}

}  // namespace rabitq_detail

struct RaBitQDevice {
    struct Params {
        int d = 0;
        int bits = 0;
        int clusters = 0;  ///< trained centroids
        int id_bytes = 1;
        RotationParams rotation;
        const float* centroids = nullptr;  ///< [clusters][d], rotated domain
        void rebase(const uint8_t* base) {
            rotation.rebase(base);
            dev::rebase(centroids, base);
        }
    };

    /// Host: from a trained RaBitQCodec (throws std::invalid_argument for another codec, an
    /// untrained one, head_dim > kMaxDim or head_dim + centroids > kMaxStateFloats).
    static Params build(const KeyCodec& cpu, ParamArena& arena);

    VQ_HD static int code_bytes(const Params& p) { return p.id_bytes + packed_size(p.d, p.bits); }
    VQ_HD static int num_scalars(const Params&) { return 1; }
    /// The rotated query q', then <q', c> of every centroid.
    VQ_HD static int state_floats(const Params& p) { return p.d + p.clusters; }

    VQ_HD static void encode(const Params& p, const float* key, int /*pos*/, uint8_t* code,
                             float* scalars, int /*stride*/) {
        const int d = p.d;
        float x[kMaxDim];
        rotate_forward(p.rotation, key, x);
        const int cid = nearest_centroid(x, p.centroids, p.clusters, d);
        const float* c = p.centroids + static_cast<std::size_t>(cid) * d;
        double e[kMaxDim];
        double norm2 = 0.0, abs_sum = 0.0;
        for (int j = 0; j < d; ++j) {
            e[j] = static_cast<double>(x[j]) - c[j];
            norm2 += e[j] * e[j];
            abs_sum += fabs(e[j]);
        }
        const int m = 1 << (p.bits - 1);
        uint8_t steps[kMaxDim];
        if (norm2 > 0.0 && m > 1) {
            rabitq_detail::CriticalValueHeap heap;
            rabitq_detail::extended_rabitq_steps(e, d, m, abs_sum, steps, heap);
        } else {
            zero_bytes(steps, d);
        }
        zero_bytes(code, code_bytes(p));
        code[0] = static_cast<uint8_t>(cid & 0xff);
        if (p.id_bytes == 2) code[1] = static_cast<uint8_t>(cid >> 8);
        uint8_t* packed = code + p.id_bytes;
        double xe = 0.0;  // <x_bar, e>
        for (int j = 0; j < d; ++j) {
            const int s = steps[j];
            const int level = e[j] >= 0.0 ? m + s : m - 1 - s;
            or_bits(packed, j, p.bits, static_cast<uint32_t>(level));
            xe += (s + 0.5) * fabs(e[j]);
        }
        // e = 0 (a key on its centroid) decodes to c exactly.
        scalars[0] = norm2 > 0.0 ? static_cast<float>(norm2 / xe) : 0.0f;
    }

    VQ_HD static void decode(const Params& p, const uint8_t* code, const float* scalars,
                             int /*stride*/, int /*pos*/, float* key) {
        const float* c = p.centroids + static_cast<std::size_t>(cluster(p, code)) * p.d;
        const uint8_t* packed = code + p.id_bytes;
        const float offset = 0.5f * static_cast<float>((1 << p.bits) - 1);
        for (int j = 0; j < p.d; ++j)
            key[j] =
                c[j] + scalars[0] * (static_cast<float>(read_bits(packed, j, p.bits)) - offset);
        rotate_inverse_in_place(p.rotation, key);
    }

    VQ_HD static void prepare(const Params& p, const float* query, float* state) {
        const int d = p.d;
        rotate_forward(p.rotation, query, state);
        for (int k = 0; k < p.clusters; ++k) {
            const float* c = p.centroids + static_cast<std::size_t>(k) * d;
            double acc = 0.0;
            for (int j = 0; j < d; ++j) acc += static_cast<double>(state[j]) * c[j];
            state[d + k] = static_cast<float>(acc);
        }
    }

    template <int R>
    VQ_HD static void score(const Params& p, const float* state, const uint8_t* code,
                            const float* scalars, int /*stride*/, int /*pos*/, float (&out)[R]) {
        const float offset = 0.5f * static_cast<float>((1 << p.bits) - 1);
        float acc[R] = {};  // <x_bar, q'>
        FieldReader levels(code + p.id_bytes, code + code_bytes(p));
        for (int j = 0; j < p.d; ++j)
            fma_rows<R>(acc, static_cast<float>(levels.next(p.bits)) - offset, state + j * R);
        float base[R];  // <q', c> of the token's centroid
        load_rows<R>(state + (p.d + cluster(p, code)) * R, base);
        for (int r = 0; r < R; ++r) out[r] = base[r] + scalars[0] * acc[r];
    }

    // The feature form (device_common.h): f_j = level_j - (2^b - 1) / 2, factor the stored
    // scale, plus the state's <q', c> entry of the token's cluster. Levels of up to 8 bits less
    // a half-integer offset are exact in fp16.
    static constexpr int kFeatureGroup = 8;
    static constexpr bool kExactHalfFeatures = true;
    VQ_HD static int feature_offset(const Params&) { return 0; }
    VQ_HD static int feature_count(const Params& p) { return p.d; }
    VQ_HD static bool features_usable(const Params&) { return true; }
    VQ_HD static float feature_factor(const float* scalars) { return scalars[0]; }
    VQ_HD static int extra_entry(const Params& p, const uint8_t* code) {
        return p.d + cluster(p, code);
    }
    VQ_HD static void features(const Params& p, const uint8_t* code, int /*pos*/, int g, float* f) {
        const float offset = 0.5f * static_cast<float>((1 << p.bits) - 1);
        FieldReader levels(code + p.id_bytes, code + code_bytes(p), 8 * g * p.bits);
        for (int k = 0; k < 8 && 8 * g + k < p.d; ++k)
            f[k] = static_cast<float>(levels.next(p.bits)) - offset;
    }

private:
    /// The token's cluster id. The CPU codec throws on an id past the trained centroids
    /// (corrupted codes); a device thread cannot, so it reads centroid 0 instead of reading out
    /// of bounds.
    VQ_HD static int cluster(const Params& p, const uint8_t* code) {
        const int cid = p.id_bytes == 1 ? code[0] : code[0] | (code[1] << 8);
        return cid < p.clusters ? cid : 0;
    }
};

}  // namespace veloxquant::dev
