// CenteredKeyCodec: any key codec applied to keys minus a per-head mean that follows RoPE.
//
// About half of a RoPE model's key energy is a mean shared by every token (SmolLM2-135M: the
// keys' mean holds 53% of their energy after RoPE and 76% before it, averaged over layers and
// heads). A codec that scales its error with ||k|| (turboquant_rvq, ratequant, polarquant, qjl,
// rabitq's residuals) spends most of its bits on that shared part. Here the cache codes
//     k_t - c_b,   c_b = (1/64) sum_{p in block b} RoPE_p(mu)
// (mu: the pre-RoPE mean, estimated from the first append; b: the block of 64 positions holding
// t) and scores add the block's <q, c_b> back, once per block and query row, so attention stays
// exact up to the inner codec's error. c_b is the average of the turned mean over the block's
// positions: pair i of it is mu_i A_i exp(j 64 b w_i), A_i = (1/64) sum_{tau < 64}
// exp(j tau w_i), so that the fast-turning pairs, whose mean changes within a block, are
// damped instead of mis-centred (on SmolLM2 at 4-bit keys, centring them by the block's middle
// position kept a third of the gain: KLD 0.045 -> 0.040, against 0.029). Without RoPE frequencies
// (rope_inv_freq empty) the centre is mu itself. With P = rope_inv_freq.size() frequencies, pair i
// is (2i, 2i + 1) (GGUF runtimes, llama.cpp's "normal" RoPE) or, half split, (i, i + P)
// (transformers' rotate_half, llama.cpp's "neox"); coordinates from 2P on (partial RoPE) are not
// turned.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "methods/key_codec.h"

namespace veloxquant {

/// A_i = (1/64) sum_{tau < 64} exp(j tau w_i) of each frequency: [pairs][2] (real, imaginary),
/// summed in double. The device caches (src/cuda/key_center.h) take the same factors.
std::vector<float> rope_block_average(const std::vector<double>& rope_inv_freq);
/// mean [dim] in place to the damped mean: pair i (re_at, im_at as rope_half_split says) times
/// A_i, coordinates from 2 * pairs on unchanged.
void damp_rope_mean(const std::vector<float>& block_average, bool rope_half_split, float* mean,
                    int dim);

class CenteredKeyCodec : public KeyCodec {
public:
    /// Positions per block of one centre.
    static constexpr int kBlock = 64;
    /// First appends of fewer tokens leave the mean at zero (no centring) for the cache's life.
    static constexpr int kMinEstimateTokens = 16;
    /// Rows of the first append that the estimate reads, evenly spaced (training_row).
    static constexpr int kMaxEstimateRows = 8192;

    /// inner: the codec of the centred keys (owned). rope_inv_freq: the model's RoPE
    /// frequencies (pair i turns by p * rope_inv_freq[i]); at most dim / 2 of them, finite and
    /// >= 0, else std::invalid_argument. dim must be even where frequencies are given.
    /// rope_half_split: pair i is (i, i + P), else (2i, 2i + 1).
    CenteredKeyCodec(std::unique_ptr<KeyCodec> inner, std::vector<double> rope_inv_freq,
                     bool rope_half_split = false);

    const KeyCodec& inner() const { return *inner_; }
    /// The inner codec, to train on keys already centred (adopt_mean, then its train()).
    KeyCodec& inner() { return *inner_; }
    /// The pre-RoPE mean [dim] (zeros before the first append, or after one that was too short).
    const std::vector<float>& mean() const { return mean_; }
    bool estimated() const { return estimated_; }
    /// Takes a mean [dim] estimated elsewhere (a device cache's first append estimates it on the
    /// device, from the rows train() reads) as train() would set it; the inner codec, if it
    /// trains, is left untrained. std::invalid_argument for a non-finite entry.
    void adopt_mean(const float* mean);
    /// c_b of block b into out [dim].
    void block_center(int64_t block, float* out) const;

    std::size_t code_bytes() const override { return inner_->code_bytes(); }
    int num_scalars() const override { return inner_->num_scalars(); }

    /// The mean is estimated once, from the first append's keys (positions 0 .. n - 1), before
    /// the inner codec trains on the centred keys.
    bool needs_training() const override { return !estimated_ || inner_->needs_training(); }
    void train(const float* keys, int n) override;
    void forget_training() noexcept override;

    /// Position-free calls are positions 0 .. n - 1.
    void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const override;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* keys) const override;
    /// The inner codec's state, then the query's products with the damped mean: per turned pair
    /// conj(q_i) mu_i A_i (real parts, then imaginary parts) and <q, mu> over the rest.
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
    void score_rows_at(const float* states, std::size_t state_stride, int rows,
                       const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                       int pos0, float* scores, std::size_t score_stride) const override;

    std::size_t parameter_bytes() const override;
    /// Whether the mean was estimated, the mean, then the inner codec's state.
    void save_state(BinaryWriter& out) const override;
    /// Throws std::runtime_error for a non-finite mean.
    void load_state(BinaryReader& in) override;
    void check_codes(const uint8_t* codes, int n) const override { inner_->check_codes(codes, n); }

private:
    // exp(j w_i x) for the turned pairs, x = 64 * block (block_phase) or a position
    // (position_phase): the real parts [pairs], then the imaginary parts [pairs].
    void block_phase(int64_t block, float* out) const;
    void position_phase(int64_t pos, float* out) const;
    // c_b into out [dim], phase [2 pairs] its scratch.
    void center_into(int64_t block, float* out, float* phase) const;
    // keys [n][dim] at positions pos0.. minus (sign -1) or plus (sign +1) their blocks' centres.
    void shift(float* keys, int n, int pos0, float sign) const;
    // damped_ and centering_ from mean_.
    void set_damped();
    // The coordinates of pair i: its real and imaginary part.
    int re_at(int i) const { return half_split_ ? i : 2 * i; }
    int im_at(int i) const { return half_split_ ? i + pairs_ : 2 * i + 1; }

    std::unique_ptr<KeyCodec> inner_;
    std::vector<double> inv_freq_;
    int pairs_ = 0;                 // turned pairs: rope_inv_freq.size()
    bool half_split_ = false;       // pair i is (i, i + pairs_), else (2i, 2i + 1)
    std::vector<float> mean_;       // [dim], pre-RoPE
    std::vector<float> damped_;     // [dim]: mu_i A_i for turned pairs, mu elsewhere
    std::vector<float> block_avg_;  // [pairs][2]: A_i
    // exp(j w_i 64 e 16^l) for level l < 4, e < 16: [4][16] phases (blocks below 16^4), and
    // exp(j w_i tau) for tau < 64: [64] phases; a phase is [2][pairs] (as block_phase's).
    std::vector<float> block_steps_, token_steps_;
    bool estimated_ = false;
    bool centering_ = false;  // a non-zero mean: shift and offset, else pass through
};

}  // namespace veloxquant
