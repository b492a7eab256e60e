// rabitq's critical values in order (step 4 of rabitq_encode.cuh's token encoder): extended
// RaBitQ's t = s / |e_j| (arXiv 2409.09913 §3.2) for a warp's token, sorted by (t, j) as the CPU's
// quantize sorts them (methods/rabitq.cpp), by 64-bit keys of an estimate of t with the tag in
// their low bits, bucketed across the warp and checked pairwise against t itself.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/codec_kernels.cuh"

namespace veloxquant::cuda::codec {

/// Insertion-sorts events [first, last) of ev_t / tags by (t, tag).
__device__ inline void rb_insertion_sort(double* ev_t, uint16_t* tags, int first, int last) {
    for (int i = first + 1; i < last; ++i) {
        const double t = ev_t[i];
        const uint16_t tag = tags[i];
        int k = i;
        for (; k > first && (ev_t[k - 1] > t || (ev_t[k - 1] == t && tags[k - 1] > tag)); --k) {
            ev_t[k] = ev_t[k - 1];
            tags[k] = tags[k - 1];
        }
        ev_t[k] = t;
        tags[k] = tag;
    }
}

/// An event's sort key: the bits of a non-negative double near t (ordered as unsigned integers
/// as the doubles are) with its low 16 mantissa bits replaced by the tag, so one integer compare
/// orders (key value, tag). The value read back (rb_key_value) is within 2^-36 of the double,
/// below it.
__device__ __forceinline__ unsigned long long rb_event_key(double t, uint16_t tag) {
    return (static_cast<unsigned long long>(__double_as_longlong(t)) & ~0xffffull) | tag;
}
__device__ __forceinline__ double rb_key_value(unsigned long long key) {
    return __longlong_as_double(static_cast<long long>(key & ~0xffffull));
}

/// Insertion-sorts keys [first, last).
__device__ inline void rb_insertion_sort_keys(unsigned long long* keys, int first, int last) {
    for (int i = first + 1; i < last; ++i) {
        const unsigned long long key = keys[i];
        int k = i;
        for (; k > first && keys[k - 1] > key; --k) keys[k] = keys[k - 1];
        keys[k] = key;
    }
}

/// Event `tag`'s critical value t = s / |e_j| (tag = j << 8 | s), as the CPU computes it.
__device__ __forceinline__ double rb_event_t(uint16_t tag, const double* abs_e) {
    return (tag & 0xff) / abs_e[tag >> 8];
}

/// Whether events of keys k0 then k1 are in (t, j) order, t = s / |e_j|: from the keys' values
/// where those are far enough apart, else from t itself. With `estimates`, a key's value is
/// within 2^-45 + 2^-36 of t (rb_sorted_events), so a gap of 2^-32 of their sum puts t in the
/// same order; else the keys are only a guess.
__device__ __forceinline__ bool rb_pair_in_order(unsigned long long k0, unsigned long long k1,
                                                 const double* abs_e, bool estimates) {
    const double v0 = rb_key_value(k0), v1 = rb_key_value(k1);
    if (estimates && v1 - v0 > 0x1p-32 * (v0 + v1)) return true;
    const auto g0 = static_cast<uint16_t>(k0), g1 = static_cast<uint16_t>(k1);
    const double t0 = rb_event_t(g0, abs_e), t1 = rb_event_t(g1, abs_e);
    return t0 < t1 || (t0 == t1 && g0 < g1);
}

/// The count of critical values s / a with s = 1 .. m - 1 and s <= t_max a (rabitq.cpp's
/// listing loop): min(m - 1, floor(t_max a)), none where the product is NaN.
__device__ __forceinline__ int rb_event_count(double a, double t_max, int m) {
    const double limit = t_max * a;
    return limit >= m - 1 ? m - 1 : limit >= 1.0 ? static_cast<int>(limit) : 0;
}

/// The critical values of a lane's coordinates (32 c + lane, |e| in a[c] and in abs_e[32 c +
/// lane]) in (t, j) order in tags[0, n), n returned to every lane; `cursor` holds n + 1 ints,
/// `keys` n sort keys (the region is then free: lane 0's fallback sort keeps t there).
template <int C>
__device__ int rb_sorted_events(const double (&a)[C], const double* abs_e, int m, double t_max,
                                unsigned long long* keys, uint16_t* tags, int* cursor, int lane) {
    int count[C], n = 0;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        count[c] = rb_event_count(a[c], t_max, m);
        n += count[c];
    }
    for (int offset = 16; offset > 0; offset >>= 1) n += __shfl_xor_sync(kFull, n, offset);
    if (n == 0) return 0;
    // The events are sorted by keys of an estimate of t, s (1 / |e|) with 1 / |e| a float
    // reciprocal refined by a Newton step: (1 / |e|)(1 - eta^2), |eta| <= 2^-23, so the estimate
    // is within 2^-45 t of t, where |e| and its reciprocal are normal floats (else the keys are
    // of the quotients). Counted into as many equal-width buckets over [0, t_max] as there are
    // events (rabitq.cpp's critical_values), scattered, each bucket (one or two events mostly)
    // insertion-sorted by one lane; then every neighbouring pair is checked against t
    // (rb_pair_in_order) and where one is out of order (rarely: two events within the keys'
    // error), lane 0 insertion-sorts the nearly sorted whole by t.
    double recip[C];
    bool wild = false;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const double r0 = __frcp_rn(static_cast<float>(a[c]));
        recip[c] = fma(r0, fma(-a[c], r0, 1.0), r0);
        wild |= count[c] > 0 && !(a[c] >= 0x1p-120 && a[c] <= 0x1p120);
    }
    const bool estimates = !__any_sync(kFull, wild);
    const double per_t = static_cast<double>(n) / t_max;
    auto bucket = [&](double est) {
        const auto b = static_cast<unsigned long long>(est * per_t);
        return b < static_cast<unsigned long long>(n - 1) ? static_cast<int>(b) : n - 1;
    };
    for (int i = lane; i <= n; i += 32) cursor[i] = 0;
    __syncwarp();
#pragma unroll
    for (int c = 0; c < C; ++c) {
        double s = 1.0;
        for (int k = 0; k < count[c]; ++k, s += 1.0)
            atomicAdd(cursor + bucket(s * recip[c]) + 1, 1);
    }
    __syncwarp();
    // cursor[b] = the first slot of bucket b: each lane scans a run, the runs' totals across
    // lanes.
    const int run = (n + 1 + 31) / 32, lo = min(lane * run, n + 1), hi = min(lo + run, n + 1);
    int total = 0;
    for (int i = lo; i < hi; ++i) total += cursor[i];
    int before = total;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(kFull, before, offset);
        if (lane >= offset) before += other;
    }
    before -= total;
    for (int i = lo; i < hi; ++i) {
        before += cursor[i];
        cursor[i] = before;
    }
    __syncwarp();
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int j = 32 * c + lane;
        double s = 1.0;
        for (int k = 0; k < count[c]; ++k, s += 1.0) {
            const double est = s * recip[c];
            const int at = atomicAdd(cursor + bucket(est), 1);
            keys[at] =
                rb_event_key(estimates ? est : s / a[c], static_cast<uint16_t>(j << 8 | (k + 1)));
        }
    }
    __syncwarp();
    // Bucket b now spans [cursor[b - 1], cursor[b]).
    for (int b = lane; b < n; b += 32)
        rb_insertion_sort_keys(keys, b == 0 ? 0 : cursor[b - 1], cursor[b]);
    __syncwarp();
    bool ordered = true;  // (tags are distinct)
    for (int i = lane; i < n; i += 32) {
        const unsigned long long key = keys[i];
        tags[i] = static_cast<uint16_t>(key);
        if (i + 1 < n) ordered &= rb_pair_in_order(key, keys[i + 1], abs_e, estimates);
    }
    __syncwarp();  // the checks' reads of the keys before any lane rewrites them (here, or after)
    if (!__all_sync(kFull, ordered)) {
        auto* ev_t = reinterpret_cast<double*>(keys);
        for (int i = lane; i < n; i += 32) ev_t[i] = rb_event_t(tags[i], abs_e);
        __syncwarp();
        if (lane == 0) rb_insertion_sort(ev_t, tags, 0, n);
        __syncwarp();
    }
    return n;
}

}  // namespace veloxquant::cuda::codec
