// Team encoders (team_encode.cuh) of the key codecs that search codebooks: commvq and vecinfer.
// A codebook search runs one warp per group or subspace, its lanes over contiguous runs of
// codewords; each codeword's distance is summed in one lane in the one-thread encoder's order,
// and the runs fold left to right (warp_fold_best) into that encoder's argmin or argmax, ties and
// NaNs included. The stages of a commvq group stay sequential in their warp.
#pragma once

#include <cmath>

#include "cuda/team_encode.cuh"
#include "device_codecs/commvq_device.h"
#include "device_codecs/vecinfer_device.h"

namespace veloxquant::cuda::team {

/// CommVQDevice::encode: the pairs un-rotated by -pos w_i across the team (phase()), then one
/// warp per group: the greedy residual search and the ICM sweep, stage by stage.
template <>
struct TeamEncoder<dev::CommVQDevice> {
    static constexpr bool kAvailable = true;
    using CommVQ = dev::CommVQDevice;
    /// Largest code: kMaxStages stages, d / 2 groups of 8-bit indices at d = kMaxDim.
    static constexpr int kMaxCodeBytes = CommVQ::kMaxStages * (dev::kMaxDim / 2);

    /// CommVQDevice::nearest across a warp (every lane gets the index). A run's scan starts
    /// empty (m = INF, best = -1) with the same rule; runs fold by a strictly smaller value, so
    /// the result is the first index of the minimum over non-NaN values, n - 1 if none.
    __device__ static int nearest(const float* x, const float* words, const float* norms2, int n,
                                  int dim) {
        int begin, end;
        lane_range(n, &begin, &end);
        float m = INFINITY;
        int best = -1;
        CommVQ::scan_nearest(x, words, norms2, begin, end, dim, &m, &best);
        best = warp_fold_best(m, best, [](float a, float b) { return a < b; });
        __syncwarp();  // every lane has read x before the caller updates it
        return best < 0 ? n - 1 : best;
    }

    __device__ static void encode(const CommVQ::Params& p, const float* key, int pos, uint8_t* code,
                                  float*, int) {
        __shared__ float u[dev::kMaxDim];  // the un-rotated key, then each group's residual r
        __shared__ int idx[kWarpsPerTeam][CommVQ::kMaxStages];
        __shared__ uint32_t words[(kMaxCodeBytes + 3) / 4];
        const int gd = p.group_dim, C = p.codewords, bytes = CommVQ::code_bytes(p);
        const SharedBits stream{words};
        stream.zero(bytes);
        // The encoder's r = k with pair i < pairs (coordinates 2i, 2i + 1 of the key, its group's
        // j, j + 1) turned by -pos w_i; d and gd are even, as CommVQCodec requires.
        for (int i = rank(); i < p.d / 2; i += kTeam) {
            const float k0 = key[2 * i], k1 = key[2 * i + 1];
            if (i < p.pairs) {
                float c, s;
                CommVQ::phase(p, pos, i, &c, &s);
                u[2 * i] = k0 * c + k1 * s;
                u[2 * i + 1] = k1 * c - k0 * s;
            } else {
                u[2 * i] = k0;
                u[2 * i + 1] = k1;
            }
        }
        sync();
        const int w = warp();
        int* ix = idx[w];
        for (int g = w; g < p.groups; g += kWarpsPerTeam) {
            float* r = u + g * gd;
            const auto words_of = [&](int st) { return p.words + (st * p.groups + g) * C * gd; };
            const auto norms_of = [&](int st) { return p.norms2 + (st * p.groups + g) * C; };
            for (int st = 0; st < p.stages; ++st) {
                const int i = nearest(r, words_of(st), norms_of(st), C, gd);
                if (lane() == 0) ix[st] = i;
                const float* cw = words_of(st) + i * gd;
                for (int j = lane(); j < gd; j += 32) r[j] -= cw[j];
                __syncwarp();
            }
            for (int sweep = 0; sweep < CommVQ::kEncodeSweeps && p.stages > 1; ++sweep)
                for (int st = 0; st < p.stages; ++st) {
                    const float* old = words_of(st) + ix[st] * gd;
                    for (int j = lane(); j < gd; j += 32) r[j] += old[j];
                    __syncwarp();  // also: every lane has read ix[st] before lane 0 rewrites it
                    const int i = nearest(r, words_of(st), norms_of(st), C, gd);
                    if (lane() == 0) ix[st] = i;
                    const float* cw = words_of(st) + i * gd;
                    for (int j = lane(); j < gd; j += 32) r[j] -= cw[j];
                    __syncwarp();
                }
            for (int st = lane(); st < p.stages; st += 32)
                stream.put((st * p.groups + g) * p.index_bits, p.index_bits,
                           static_cast<uint32_t>(ix[st]));
            __syncwarp();  // ix is the next group's
        }
        stream.store(code, bytes);
    }
};

/// VecInferDevice::encode: x = R (k / lambda) across the team, then one warp per subspace.
template <>
struct TeamEncoder<dev::VecInferDevice> {
    static constexpr bool kAvailable = true;
    /// At most kMaxDim subspaces of 12-bit indices (4096 codewords).
    static constexpr int kMaxCodeBytes = kCommonMaxCodeBytes;
    using VecInfer = dev::VecInferDevice;

    /// VecInferDevice::nearest across a warp (every lane gets the index). A run's scan starts
    /// empty (best_v = -INF, none taken) with the same rule; runs fold by a strictly larger
    /// value, so the result is the first index of the maximum among values > -INF, 0 if none.
    __device__ static int nearest(const VecInfer::Params& p, int s, const float* x) {
        int begin, end;
        lane_range(p.codewords, &begin, &end);
        float best_v = -INFINITY;
        int best = -1;
        VecInfer::scan_nearest(p, s, x, begin, end, &best_v, &best);
        best = warp_fold_best(best_v, best, [](float a, float b) { return a > b; });
        return best < 0 ? 0 : best;
    }

    __device__ static void encode(const VecInfer::Params& p, const float* key, int, uint8_t* code,
                                  float*, int) {
        __shared__ float x[dev::kMaxDim], y[dev::kMaxDim];
        __shared__ uint32_t words[(kMaxCodeBytes + 3) / 4];
        const int bytes = VecInfer::code_bytes(p);
        for (int j = rank(); j < p.d; j += kTeam) x[j] = key[j] * p.inv_smooth[j];
        sync();
        rotate(p.rotation, x, y);
        const SharedBits stream{words};
        stream.zero(bytes);
        for (int s = warp(); s < p.subspaces; s += kWarpsPerTeam) {
            const int i = nearest(p, s, y + s * p.sub_dim);
            if (lane() == 0) stream.put(s * p.code_bits, p.code_bits, static_cast<uint32_t>(i));
        }
        stream.store(code, bytes);
    }
};

}  // namespace veloxquant::cuda::team
