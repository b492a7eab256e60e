#include "methods/centered_key_codec.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace veloxquant {
namespace {

// block_phase's table: four levels of 16 blocks, so blocks below 16^4 (4M positions) take three
// complex products of table entries; later blocks compute their angle in double.
constexpr int kLevels = 4, kLevelSize = 16;
constexpr int64_t kTabledBlocks = int64_t{1} << (4 * kLevels);

// Per-thread scratch of at least n floats, reused across calls (a centre and its phases per
// page scored: no allocation on the decode's path).
float* scratch(std::size_t n) {
    thread_local std::vector<float> buffer;
    if (buffer.size() < n) buffer.resize(n);
    return buffer.data();
}

// (re[i], im[i]) *= (step[i], step[n + i]) for i < n, as complex numbers (the phases' layout:
// n real parts, then n imaginary parts).
void turn_all(float* re, float* im, const float* step, int n) {
    const float* c = step;
    const float* s = step + n;
    for (int i = 0; i < n; ++i) {
        const float r = re[i] * c[i] - im[i] * s[i];
        im[i] = re[i] * s[i] + im[i] * c[i];
        re[i] = r;
    }
}

// (x, y) *= (c, s), as complex numbers.
inline void turn(float& x, float& y, float c, float s) {
    const float nx = x * c - y * s;
    y = x * s + y * c;
    x = nx;
}

}  // namespace

std::vector<float> rope_block_average(const std::vector<double>& rope_inv_freq) {
    std::vector<float> avg(2 * rope_inv_freq.size());
    for (std::size_t i = 0; i < rope_inv_freq.size(); ++i) {
        double ar = 0.0, ai = 0.0;
        for (int tau = 0; tau < CenteredKeyCodec::kBlock; ++tau) {
            ar += std::cos(rope_inv_freq[i] * tau);
            ai += std::sin(rope_inv_freq[i] * tau);
        }
        avg[2 * i] = static_cast<float>(ar / CenteredKeyCodec::kBlock);
        avg[2 * i + 1] = static_cast<float>(ai / CenteredKeyCodec::kBlock);
    }
    return avg;
}

void damp_rope_mean(const std::vector<float>& block_average, bool rope_half_split, float* mean,
                    int dim) {
    const int pairs = static_cast<int>(block_average.size() / 2);
    for (int i = 0; i < pairs && 2 * i + 1 < dim; ++i) {
        const int re = rope_half_split ? i : 2 * i, im = rope_half_split ? i + pairs : 2 * i + 1;
        turn(mean[re], mean[im], block_average[2 * i], block_average[2 * i + 1]);
    }
}

CenteredKeyCodec::CenteredKeyCodec(std::unique_ptr<KeyCodec> inner,
                                   std::vector<double> rope_inv_freq, bool rope_half_split)
    : KeyCodec(inner ? inner->dim() : 0),
      inner_(std::move(inner)),
      inv_freq_(std::move(rope_inv_freq)),
      half_split_(rope_half_split) {
    if (!inner_) throw std::invalid_argument("CenteredKeyCodec: no inner key codec");
    const int d = dim();
    if (!inv_freq_.empty() && d % 2 != 0)
        throw std::invalid_argument("center_keys with rope_inv_freq needs an even head_dim, got " +
                                    std::to_string(d));
    if (inv_freq_.size() > static_cast<std::size_t>(d / 2))
        throw std::invalid_argument(
            "rope_inv_freq has " + std::to_string(inv_freq_.size()) +
            " frequencies, more than head_dim / 2 = " + std::to_string(d / 2));
    for (double w : inv_freq_)
        if (!std::isfinite(w) || w < 0.0)
            throw std::invalid_argument("rope_inv_freq must be finite and >= 0");
    pairs_ = static_cast<int>(inv_freq_.size());
    mean_.assign(d, 0.0f);
    damped_.assign(d, 0.0f);
    block_avg_ = rope_block_average(inv_freq_);
    block_steps_.resize(static_cast<std::size_t>(kLevels) * kLevelSize * pairs_ * 2);
    token_steps_.resize(static_cast<std::size_t>(kBlock) * pairs_ * 2);
    for (int i = 0; i < pairs_; ++i) {
        const double w = inv_freq_[i];
        for (int tau = 0; tau < kBlock; ++tau) {
            float* step = &token_steps_[static_cast<std::size_t>(tau) * 2 * pairs_];
            step[i] = static_cast<float>(std::cos(w * tau));
            step[pairs_ + i] = static_cast<float>(std::sin(w * tau));
        }
        for (int l = 0; l < kLevels; ++l)
            for (int e = 0; e < kLevelSize; ++e) {
                const double angle = w * kBlock * static_cast<double>(e) * std::pow(16.0, l);
                float* step =
                    &block_steps_[(static_cast<std::size_t>(l) * kLevelSize + e) * 2 * pairs_];
                step[i] = static_cast<float>(std::cos(angle));
                step[pairs_ + i] = static_cast<float>(std::sin(angle));
            }
    }
}

void CenteredKeyCodec::block_phase(int64_t block, float* out) const {
    if (pairs_ == 0) return;  // (no tables to index)
    float *re = out, *im = out + pairs_;
    if (block >= kTabledBlocks) {
        for (int i = 0; i < pairs_; ++i) {
            const double angle = inv_freq_[i] * kBlock * static_cast<double>(block);
            re[i] = static_cast<float>(std::cos(angle));
            im[i] = static_cast<float>(std::sin(angle));
        }
        return;
    }
    std::fill(re, re + pairs_, 1.0f);
    std::fill(im, im + pairs_, 0.0f);
    for (int l = 0; l < kLevels; ++l) {
        const int e = static_cast<int>((block >> (4 * l)) & (kLevelSize - 1));
        if (e == 0) continue;
        turn_all(re, im, &block_steps_[(static_cast<std::size_t>(l) * kLevelSize + e) * 2 * pairs_],
                 pairs_);
    }
}

void CenteredKeyCodec::position_phase(int64_t pos, float* out) const {
    if (pairs_ == 0) return;
    block_phase(pos / kBlock, out);
    turn_all(out, out + pairs_, &token_steps_[static_cast<std::size_t>(pos % kBlock) * 2 * pairs_],
             pairs_);
}

void CenteredKeyCodec::block_center(int64_t block, float* out) const {
    center_into(block, out, scratch(2 * static_cast<std::size_t>(pairs_)));
}

void CenteredKeyCodec::center_into(int64_t block, float* out, float* phase) const {
    std::copy(damped_.begin(), damped_.end(), out);
    if (pairs_ == 0) return;
    block_phase(block, phase);
    for (int i = 0; i < pairs_; ++i)
        turn(out[re_at(i)], out[im_at(i)], phase[i], phase[pairs_ + i]);
}

void CenteredKeyCodec::shift(float* keys, int n, int pos0, float sign) const {
    if (!centering_) return;
    const int d = dim();
    float* c = scratch(static_cast<std::size_t>(d) + 2 * pairs_);
    for (int t = 0; t < n;) {
        const int64_t block = (static_cast<int64_t>(pos0) + t) / kBlock;
        const int end = static_cast<int>(std::min<int64_t>(n, (block + 1) * kBlock - pos0));
        center_into(block, c, c + d);
        for (; t < end; ++t) {
            float* k = keys + static_cast<std::size_t>(t) * d;
            for (int j = 0; j < d; ++j) k[j] += sign * c[j];
        }
    }
}

void CenteredKeyCodec::train(const float* keys, int n) {
    if (n < 1) throw std::invalid_argument("CenteredKeyCodec::train needs at least one key");
    const int d = dim();
    if (!estimated_) {
        std::fill(mean_.begin(), mean_.end(), 0.0f);
        if (n >= kMinEstimateTokens) {
            // The pre-RoPE mean: each row turned back by its position, averaged in double.
            const int m = std::min(n, kMaxEstimateRows);
            std::vector<double> acc(d, 0.0);
            std::vector<float> phase(2 * static_cast<std::size_t>(pairs_));
            for (int r = 0; r < m; ++r) {
                const int64_t row = training_row(r, n, m);
                const float* k = keys + row * d;
                position_phase(row, phase.data());
                for (int i = 0; i < pairs_; ++i) {
                    const float c = phase[i], s = phase[pairs_ + i];
                    acc[re_at(i)] += k[re_at(i)] * c + k[im_at(i)] * s;
                    acc[im_at(i)] += k[im_at(i)] * c - k[re_at(i)] * s;
                }
                for (int j = 2 * pairs_; j < d; ++j) acc[j] += k[j];
            }
            for (int j = 0; j < d; ++j) mean_[j] = static_cast<float>(acc[j] / m);
        }
        set_damped();
        estimated_ = true;
    }
    if (inner_->needs_training()) {
        std::vector<float> centered(keys, keys + static_cast<std::size_t>(n) * d);
        shift(centered.data(), n, 0, -1.0f);
        inner_->train(centered.data(), n);
    }
}

void CenteredKeyCodec::adopt_mean(const float* mean) {
    for (int j = 0; j < dim(); ++j)
        if (!std::isfinite(mean[j]))
            throw std::invalid_argument("CenteredKeyCodec::adopt_mean: non-finite key mean");
    mean_.assign(mean, mean + dim());
    set_damped();
    estimated_ = true;
}

void CenteredKeyCodec::forget_training() noexcept {
    estimated_ = false;
    centering_ = false;
    std::fill(mean_.begin(), mean_.end(), 0.0f);
    std::fill(damped_.begin(), damped_.end(), 0.0f);
    inner_->forget_training();
}

void CenteredKeyCodec::encode(const float* keys, int n, uint8_t* codes, float* scalars,
                              std::size_t scalar_stride) const {
    encode_at(keys, n, 0, codes, scalars, scalar_stride);
}

void CenteredKeyCodec::decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride,
                              int n, float* keys) const {
    decode_at(codes, scalars, scalar_stride, n, 0, keys);
}

void CenteredKeyCodec::encode_at(const float* keys, int n, int pos0, uint8_t* codes, float* scalars,
                                 std::size_t scalar_stride) const {
    if (!centering_) return inner_->encode_at(keys, n, pos0, codes, scalars, scalar_stride);
    std::vector<float> centered(keys, keys + static_cast<std::size_t>(n) * dim());
    shift(centered.data(), n, pos0, -1.0f);
    inner_->encode_at(centered.data(), n, pos0, codes, scalars, scalar_stride);
}

void CenteredKeyCodec::decode_at(const uint8_t* codes, const float* scalars,
                                 std::size_t scalar_stride, int n, int pos0, float* keys) const {
    inner_->decode_at(codes, scalars, scalar_stride, n, pos0, keys);
    shift(keys, n, pos0, 1.0f);
}

std::size_t CenteredKeyCodec::query_state_size() const {
    // Rounded up to 16 floats, so that the inner codec's states keep the alignment of their
    // rows (64 bytes) that they have without centring.
    const std::size_t own = 2 * static_cast<std::size_t>(pairs_) + 1;
    return inner_->query_state_size() + (own + 15) / 16 * 16;
}

void CenteredKeyCodec::prepare_query(const float* query, float* state) const {
    inner_->prepare_query(query, state);
    // <q, c_b> = sum_i Re(W_i phase_i(b)) + <q, mean> over the unturned coordinates, with
    // W_i = conj(q_i) mu_i A_i: the products W (real parts, then imaginary) and that sum.
    float* w = state + inner_->query_state_size();
    for (int i = 0; i < pairs_; ++i) {
        const float qr = query[re_at(i)], qi = query[im_at(i)];
        const float dr = damped_[re_at(i)], di = damped_[im_at(i)];
        w[i] = qr * dr + qi * di;
        w[pairs_ + i] = qr * di - qi * dr;
    }
    float rest = 0.0f;
    for (int j = 2 * pairs_; j < dim(); ++j) rest += query[j] * damped_[j];
    w[2 * pairs_] = rest;
}

void CenteredKeyCodec::score(const float* state, const uint8_t* codes, const float* scalars,
                             std::size_t scalar_stride, int n, float* scores) const {
    score_rows_at(state, 0, 1, codes, scalars, scalar_stride, n, 0, scores, 0);
}

void CenteredKeyCodec::score_at(const float* state, const uint8_t* codes, const float* scalars,
                                std::size_t scalar_stride, int n, int pos0, float* scores) const {
    score_rows_at(state, 0, 1, codes, scalars, scalar_stride, n, pos0, scores, 0);
}

void CenteredKeyCodec::score_rows_at(const float* states, std::size_t state_stride, int rows,
                                     const uint8_t* codes, const float* scalars,
                                     std::size_t scalar_stride, int n, int pos0, float* scores,
                                     std::size_t score_stride) const {
    inner_->score_rows_at(states, state_stride, rows, codes, scalars, scalar_stride, n, pos0,
                          scores, score_stride);
    // <q, k> = <q, k - c_b> + <q, c_b>: one product per block and row.
    if (!centering_) return;
    const std::size_t w_at = inner_->query_state_size();
    float* phase = scratch(2 * static_cast<std::size_t>(pairs_));
    for (int t = 0; t < n;) {
        const int64_t block = (static_cast<int64_t>(pos0) + t) / kBlock;
        const int end = static_cast<int>(std::min<int64_t>(n, (block + 1) * kBlock - pos0));
        block_phase(block, phase);
        for (int r = 0; r < rows; ++r) {
            const float* w = states + r * state_stride + w_at;
            // Eight partial sums, which the compiler keeps in vector lanes.
            float part[8] = {};
            int i = 0;
            for (; i + 8 <= pairs_; i += 8)
                for (int l = 0; l < 8; ++l)
                    part[l] += w[i + l] * phase[i + l] - w[pairs_ + i + l] * phase[pairs_ + i + l];
            float offset = w[2 * pairs_];
            for (; i < pairs_; ++i) offset += w[i] * phase[i] - w[pairs_ + i] * phase[pairs_ + i];
            for (float x : part) offset += x;
            float* s = scores + r * score_stride;
            for (int u = t; u < end; ++u) s[u] += offset;
        }
        t = end;
    }
}

std::size_t CenteredKeyCodec::parameter_bytes() const {
    return inner_->parameter_bytes() + inv_freq_.size() * sizeof(double) +
           (mean_.size() + damped_.size() + block_avg_.size() + block_steps_.size() +
            token_steps_.size()) *
               sizeof(float);
}

void CenteredKeyCodec::save_state(BinaryWriter& out) const {
    out.put<uint8_t>(estimated_ ? 1 : 0);
    out.vec(mean_);
    inner_->save_state(out);
}

void CenteredKeyCodec::load_state(BinaryReader& in) {
    const uint8_t estimated = in.get<uint8_t>();
    std::vector<float> mean = in.vec<float>(static_cast<std::size_t>(dim()));
    const bool zero = std::all_of(mean.begin(), mean.end(), [](float x) { return x == 0.0f; });
    if (estimated > 1 || mean.size() != static_cast<std::size_t>(dim()) || (!estimated && !zero))
        throw std::runtime_error("corrupted cache file: bad key mean of a centred codec");
    for (float x : mean)
        if (!std::isfinite(x))
            throw std::runtime_error("corrupted cache file: non-finite key mean");
    inner_->load_state(in);
    estimated_ = estimated != 0;
    mean_ = std::move(mean);
    set_damped();
}

void CenteredKeyCodec::set_damped() {
    damped_ = mean_;
    damp_rope_mean(block_avg_, half_split_, damped_.data(), dim());
    centering_ = std::any_of(mean_.begin(), mean_.end(), [](float x) { return x != 0.0f; });
}

}  // namespace veloxquant
