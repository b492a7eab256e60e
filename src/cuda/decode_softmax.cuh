// The online softmax of the split-K decode kernel (turboquant_decode.cuh) over one page of a
// warp: the logits of the page's 64 tokens from their scores, then the running max, base and sum
// of each head slot of the thread and the rescale of its output (the online softmax of
// FlashAttention-2, Dao 2023, Algorithm 1, in log2 units). The kernel keeps the logits as
// y = x - shift, shift being the softmax's base (the running max, or 0 before any) less
// log2_pair, so that exp2(y) is p'' = value_pair_scale p while the max stays (one FMA makes y);
// thr = m_run - shift is the y a logit must pass to move the max.
#pragma once

#include <cmath>

#include "cuda/ptx_wrappers.cuh"
#include "cuda/turboquant_kernels.cuh"

namespace veloxquant::cuda::kernels {

/// Logits x[mt][r][j] (the y above) of token 16 mt + 8 r + row_token for slot j's head, from the
/// page's score fragments sc (SUM_HILO: columns 2 r and 2 r + 1 are the fp16 scores' hi and lo
/// parts of the slot's head; otherwise column 2 r + j holds slot j's score, as integer scores
/// leave head block j's sum there): (score mul + add) norm - shift, and -inf for tokens at or
/// past `valid` (the tokens of the page in use) and for tokens in [mask_from, mask_to) (a
/// sliding window's, relative to the page; an empty range without one).
template <int SLOTS, bool SUM_HILO>
__device__ __forceinline__ void page_logits(const float (&sc)[4][4], const float (&mul)[SLOTS],
                                            const float (&add)[SLOTS], const float (&norm)[4][2],
                                            const float (&shift)[SLOTS], int valid, int mask_from,
                                            int mask_to, int row_token, float (&x)[4][2][SLOTS]) {
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
            for (int j = 0; j < SLOTS; ++j) {
                const float s = SUM_HILO ? sc[mt][2 * r] + sc[mt][2 * r + 1] : sc[mt][2 * r + j];
                x[mt][r][j] = fmaf(s * mul[j] + add[j], norm[mt][r], -shift[j]);
            }
        }
    }
    const bool masks = mask_from < mask_to && mask_to > 0 && mask_from < kPage;
    if (valid < kPage || masks) {  // the sequence's last page, or a window's edge
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int token = 16 * mt + 8 * r + row_token;
                const bool hidden = token >= valid || (token >= mask_from && token < mask_to);
#pragma unroll
                for (int j = 0; j < SLOTS; ++j)
                    if (hidden) x[mt][r][j] = -INFINITY;
            }
    }
}

/// One page's step of the online softmax: the logits x become p'' = exp2(y) in place, each slot's
/// running max (m_run), sum of p'' (l_run), shift and thr move on, and the output fragments o
/// (columns 2t and 2t + 2 of slot 0's head, 2t + 1 and 2t + 3 of the last slot's) are rescaled
/// where the max moved.
template <int SLOTS, int VTILES>
__device__ __forceinline__ void page_softmax(float (&x)[4][2][SLOTS], float (&m_run)[SLOTS],
                                             float (&l_run)[SLOTS], float (&shift)[SLOTS],
                                             float (&thr)[SLOTS], float log2_pair,
                                             float (&o)[VTILES][4]) {
    // The page max (three dependent shuffles per head) only when some logit of the warp exceeds
    // its running max, as on the first page; otherwise the running max stays the base and nothing
    // is rescaled, exactly as the max would give (ncu: the shuffle chain's FMNMX stalls were 3.5%
    // of the samples). A NaN logit also takes the max. The thread's largest logit by a tree of
    // NaN-keeping maxima: a chain of 4 instead of 8 compares.
    bool grow = false;
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
        float top[4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) top[mt] = max_nan(x[mt][0][j], x[mt][1][j]);
        grow |= !(max_nan(max_nan(top[0], top[1]), max_nan(top[2], top[3])) <= thr[j]);
    }
    const bool moved = __any_sync(kFull, grow);
    float corr[SLOTS];
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
        corr[j] = 1.0f;
        if (moved) {
            float bm = -INFINITY;
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) bm = fmaxf(bm, fmaxf(x[mt][0][j], x[mt][1][j]));
            bm = fmaxf(bm, __shfl_xor_sync(kFull, bm, 4));
            bm = fmaxf(bm, __shfl_xor_sync(kFull, bm, 8));
            bm = fmaxf(bm, __shfl_xor_sync(kFull, bm, 16));
            const float m_new = fmaxf(m_run[j], bm + shift[j]);
            const float base = m_new == -INFINITY ? 0.0f : m_new;
            corr[j] = exp2_approx(m_run[j] - base);
            m_run[j] = m_new;
            const float delta = base - log2_pair - shift[j];
            shift[j] = base - log2_pair;
            thr[j] = m_new - shift[j];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) x[mt][0][j] -= delta, x[mt][1][j] -= delta;
        }
        float sum = 0.0f;
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                x[mt][r][j] = exp2_approx(x[mt][r][j]);
                sum += x[mt][r][j];
            }
        l_run[j] = l_run[j] * corr[j] + sum;
    }
    if (moved) {
#pragma unroll
        for (int v = 0; v < VTILES; ++v) {
            o[v][0] *= corr[0], o[v][2] *= corr[0];
            o[v][1] *= corr[SLOTS - 1], o[v][3] *= corr[SLOTS - 1];
        }
    }
}

}  // namespace veloxquant::cuda::kernels
