// CommVQ key codec (Li et al., "CommVQ: Commutative Vector Quantization for KV Cache
// Compression", arXiv 2506.18879): additive vector quantization of keys over the RoPE frequency
// pairs with codewords made of complex scalars, which commute with RoPE.
//
// A key x in R^d is read as z in C^{d/2}, pair i = x[2i] + j x[2i+1]; "normal" RoPE multiplies
// pair i by exp(j p w_i) (w_i = rope_inv_freq[i], p = position). A linear map commutes with every
// RoPE rotation iff it is block-diagonal over the frequencies with complex-scalar blocks (the
// paper's RoPE-commutative codebook); with codewords of complex scalars per pair, the decoded
// key of a token at position p is RoPE_p of the position-free decode of the same code,
// and the cache can code the key *before* RoPE (un-rotate by -p w_i), keep no position per
// token (the cache knows it), and rotate the query instead at score time.
//
// Our structure (our choice, not the paper's exact layout: additive stages restricted to groups
// of pairs so that the code search stays cheap): the d/2 pairs are split into G groups of
// g consecutive pairs (group_dim = 2g reals); each group has S additive stages, and stage s of
// group G holds C codewords, each a vector of g complex scalars. The pre-RoPE key of a group is
//     z_G ~= sum_s W[s][G][i_{s,G}],
// with S * G indices of log2(C) bits each, so bits per coordinate = S log2(C) / (2g); no
// per-token scalars. calibrate_commvq picks C = 256, g = 4 and S = bits (b = 1..4).
// Encoding: greedy residual search, then one ICM sweep (each stage re-chosen given the others,
// which never increases the error; Babenko & Lempitsky, "Additive Quantization", CVPR 2014).
//
// Score of a query q against a token at position p (Re(conj(a) b) is the real dot product of
// two pairs):
//     <q, RoPE_p(z_hat)> = sum_i Re(conj(q_i exp(-j p w_i)) z_hat_i).
// With p = p_b + t (p_b a multiple of 64, t < 64) this is <RoPE_{-p_b}(q), RoPE_t(z_hat)>: the
// query turns once per block of 64 positions (double-precision angle), the codeword sum of a
// token turns by a table exp(j t w_i) once for all query rows (commvq_scores.h). A lookup table
// of <q, codeword> per (stage, group, codeword) is exact only without RoPE: with it, each pair
// of a group turns by its own frequency, so such a table would depend on the position (one
// per token, larger than the codeword sum it replaces).
//
// Without RoPE frequencies (config.rope_inv_freq empty) keys are coded as given (post-RoPE),
// positions are ignored and the query state is that table, [stages * groups][codewords]. Pairs i >=
// rope_inv_freq.size() (partial RoPE) are never rotated.
//
// KVCacheConfig.codebook layout: [layers][kv_heads][S][G][C][2g] float32, row-major;
// num_subspaces (when set) must equal S.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "methods/key_codec.h"

namespace veloxquant {

/// Index of the codeword nearest to x [dim] (squared L2, ties to the lowest index), with the
/// codewords transposed, words_t [dim][num_words] (num_words <= 256), and norms2[c] their
/// squared norms. The transposed layout lets the distances of all codewords vectorise.
int commvq_nearest(const float* x, const float* words_t, const float* norms2, int num_words,
                   int dim);

/// commvq_nearest's result, found faster where the CPU runs the AVX2 or AVX-512 kernels: the
/// distances with fused multiply-adds first, then the codec's own only for the codewords within
/// the two's rounding difference of the least. `bound` [1 + dim] is commvq_search_bound's.
int commvq_nearest_bounded(const float* x, const float* words_t, const float* norms2,
                           const float* bound, int num_words, int dim);

/// For commvq_nearest_bounded: bound[0] = max_c |norms2[c]|, bound[1 + j] = max_c |w_j[c]|.
void commvq_search_bound(const float* words_t, const float* norms2, int num_words, int dim,
                         float* bound);

/// words [n][dim] -> out [dim][n].
void commvq_transpose(const float* words, int n, int dim, float* out);

/// Rotates the pairs of x [dim] in place by angle pos * inv_freq[i] (pairs past inv_freq
/// untouched); pos < 0 un-rotates. Double-precision angles.
void commvq_rope(float* x, int dim, const std::vector<double>& inv_freq, double pos);

class CommVQCodec : public KeyCodec {
public:
    /// Positions per phase block: one double-precision cos/sin per pair per block, then a table.
    static constexpr int kPhaseBlock = 64;
    static constexpr int kMaxDim = 1024;

    /// codebook: this (layer, head)'s codewords [stages][groups][codewords][group_dim] (copied).
    /// Throws std::invalid_argument for inconsistent sizes (groups * group_dim != d, odd
    /// group_dim, codewords not a power of two in 2..256, rope_inv_freq longer than d/2 or not
    /// finite and >= 0, non-finite codewords).
    CommVQCodec(int d, const float* codebook, int stages, int groups, int codewords, int group_dim,
                std::vector<double> rope_inv_freq);

    int stages() const { return stages_; }
    int groups() const { return groups_; }
    int codewords() const { return codewords_; }
    int group_dim() const { return group_dim_; }
    int index_bits() const { return index_bits_; }
    /// Code bits per key coordinate: stages * log2(codewords) / group_dim.
    double bits_per_coordinate() const;
    /// Whether keys are coded before RoPE (rope_inv_freq given).
    bool positional() const { return !inv_freq_.empty(); }
    /// Every codeword, [stages][groups][codewords][group_dim].
    const std::vector<float>& codebook() const { return words_; }
    /// Squared norms of the codewords, [stages][groups][codewords].
    const std::vector<float>& codeword_norms2() const { return norms2_; }
    /// commvq_search_bound of every (stage, group) slice, [stages][groups][1 + group_dim].
    const std::vector<float>& search_bounds() const { return bounds_; }
    /// The RoPE frequencies of the rotated pairs (empty: keys coded as given).
    const std::vector<double>& rope_inv_freq() const { return inv_freq_; }
    /// cos, sin of t * w_i for t < 64 and the rotated pairs, [64][pairs][2] (see phases()).
    const std::vector<float>& phase_steps() const { return step_; }
    /// Codeword c of stage s, group g: group_dim floats.
    const float* word(int s, int g, int c) const {
        return &words_[((static_cast<std::size_t>(s) * groups_ + g) * codewords_ + c) * group_dim_];
    }

    std::size_t code_bytes() const override;
    int num_scalars() const override { return 0; }

    /// Position-free calls are positions 0..n-1 of a run in positional mode.
    void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const override;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* keys) const override;
    std::size_t query_state_size() const override;
    void prepare_query(const float* query, float* state) const override;
    void score(const float* state, const uint8_t* codes, const float* scalars,
               std::size_t scalar_stride, int n, float* scores) const override;

    void encode_at(const float* keys, int n, int pos0, uint8_t* codes, float* scalars,
                   std::size_t scalar_stride) const override;
    void decode_at(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                   int pos0, float* keys) const override;
    void score_at(const float* state, const uint8_t* codes, const float* scalars,
                  std::size_t scalar_stride, int n, int pos0, float* scores) const override;
    /// Positional: the codeword sum of each token is built once for all rows
    /// (commvq_rope_scores). Otherwise per row a lookup-table sum over the code's indices.
    void score_rows_at(const float* states, std::size_t state_stride, int rows,
                       const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                       int pos0, float* scores, std::size_t score_stride) const override;

    std::size_t parameter_bytes() const override;

    /// Codes one pre-RoPE key x [d] (greedy residual + one ICM sweep) into indices
    /// [stages * groups] (stage-major).
    void quantize(const float* x, int* indices) const;
    /// Codeword index m = s * groups + G of one code.
    int index(const uint8_t* code, int m) const;
    /// Pre-RoPE reconstruction of one code into z [d].
    void reconstruct(const uint8_t* code, float* z) const;

private:
    // cos/sin of pos * w_i for the rotated pairs, positions pos0 .. pos0 + n - 1, as
    // [n][rotated_pairs][2] floats.
    void phases(int pos0, int n, float* out) const;
    void pack(const int* indices, uint8_t* code) const;

    int stages_, groups_, codewords_, group_dim_, index_bits_;
    std::vector<float> words_;    // [stages][groups][codewords][group_dim]
    std::vector<float> words_t_;  // [stages][groups][group_dim][codewords], for the search
    std::vector<float> norms2_;   // [stages][groups][codewords]
    std::vector<float> bounds_;   // [stages][groups][1 + group_dim]: commvq_search_bound's
    std::vector<double> inv_freq_;
    std::vector<float> step_;  // [kPhaseBlock][rotated_pairs][2]: cos, sin of t * w_i
};

/// The codec of (layer, head) from config.codebook (layout above), after checking the codebook
/// against the config: a missing codebook names calibrate_commvq; a mis-shaped one, or one
/// whose bits per coordinate differ from config.bits, gets a specific std::invalid_argument.
std::unique_ptr<CommVQCodec> make_commvq_codec(const KVCacheConfig& config, int head_dim, int layer,
                                               int head);

}  // namespace veloxquant
