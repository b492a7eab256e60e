// CommVQ calibration: the RoPE-commutative additive codebooks of methods/commvq.h, trained per
// layer and KV head on calibration keys by EM (Li et al., arXiv 2506.18879).
//
// Keys arrive post-RoPE with their positions; where the RoPE frequencies are known they are
// un-rotated by their positions first, so the codebook models pre-RoPE keys (what the codec
// codes when KVCacheConfig.rope_inv_freq is set). Without frequencies the post-RoPE keys are
// used as they are (set no rope_inv_freq on the cache then).
//
// Per group of pairs the objective is sum_n ||x_n - sum_s W_s[a_{s,n}]||^2. Initialisation is
// residual k-means (stage s: C distinct residuals of stages < s drawn at random, then Lloyd
// iterations of that stage alone; the assignment kernel is methods/commvq.h's, several times
// faster at C = 256 than core/kmeans.h's on 8-dimensional points). Each EM
// sweep then visits the stages in turn: E-step, a_s = nearest codeword of W_s to the target
// x - sum_{s' != s} W_{s'}[a_{s'}] (the exact minimiser over a_s given the others); M-step,
// W_s[c] = mean of the targets assigned to c (the exact minimiser over W_s; an empty codeword
// keeps its value). Both steps are exact block-coordinate minimisations, so the objective never
// increases (Babenko & Lempitsky, "Additive Quantization", CVPR 2014, with the ICM encoder).
#pragma once

#include <cstdint>
#include <vector>

#include "calibration/activations.h"
#include "veloxquant/config.h"

namespace veloxquant {

struct CommVQCalibration {
    /// [layers][kv_heads][stages][groups][codewords][group_dim] (methods/commvq.h), to set as
    /// KVCacheConfig.codebook together with rope_inv_freq = acts.rope.inv_freq.
    FloatArray codebook;
    /// Additive stages S (= bits): KVCacheConfig.num_subspaces.
    int num_codebooks = 0;
};

/// Codebooks at `bits` per coordinate (1..4): C = 256 codewords per stage over groups of 4 RoPE
/// pairs (8 coordinates), S = bits stages. Every layer must have the same KV heads and head dim
/// (a multiple of 8), every head at least 256 key samples, and, when acts.rope.inv_freq is set,
/// every sample a position >= 0. Throws std::invalid_argument naming what is wrong.
CommVQCalibration calibrate_commvq(const Activations& acts, int bits, uint64_t seed);

struct CommVQFitOptions {
    int codewords = 256;      ///< C per stage: a power of two in 2..256
    int group_pairs = 4;      ///< RoPE pairs per group (group_dim = 2 * group_pairs)
    int init_iterations = 6;  ///< Lloyd iterations of each stage alone at initialisation
    int em_sweeps = 3;        ///< EM sweeps over all stages after the initialisation
};

struct CommVQHeadFit {
    int stages = 0, groups = 0, codewords = 0, group_dim = 0;
    std::vector<float> codebook;  ///< [stages][groups][codewords][group_dim]
    /// Total squared error over all samples after the initialisation (entry 0) and after each
    /// EM sweep; non-increasing.
    std::vector<double> objective_history;
};

/// Fits one head's codebook to keys [n][d] as the codec will see them (pre-RoPE when RoPE is
/// known). stages = bits * group_dim / log2(codewords) must be a whole number; n >= codewords.
CommVQHeadFit fit_commvq_head(const float* keys, int n, int d, int bits, uint64_t seed,
                              const CommVQFitOptions& options = {});

}  // namespace veloxquant
