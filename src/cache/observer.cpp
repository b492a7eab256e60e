#include "veloxquant/observer.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <vector>

#include "core/parallel_errors.h"

namespace veloxquant {

double KeyNormObserver::Stats::std_log() const {
    return count > 1 ? std::sqrt(m2_log / static_cast<double>(count - 1)) : 0.0;
}

double KeyNormObserver::Stats::heterogeneity_ratio() const {
    return min_norm > 0.0 ? max_norm / min_norm : 0.0;
}

KeyNormObserver::KeyNormObserver(double z_threshold, int64_t min_count)
    : z_threshold_(z_threshold), min_count_(min_count) {
    if (!(z_threshold > 0.0) || !std::isfinite(z_threshold))
        throw std::invalid_argument("KeyNormObserver: z_threshold must be a positive number");
    if (min_count < 2) throw std::invalid_argument("KeyNormObserver: min_count must be >= 2");
}

double KeyNormObserver::log_norm(float norm) {
    // log of a zero norm is -inf; clamp to the smallest positive float so it stays counted (and
    // flagged: a zero key is as far in the low tail as a key can be).
    return std::log(std::max(static_cast<double>(norm), 1e-30));
}

KeyNormObserver::Stats KeyNormObserver::chunk_stats(const float* norms, const double* logs, int n) {
    Stats c;
    if (n <= 0) return c;
    // Two passes over the chunk (mean, then squared deviations from it): sums without a
    // dependency through a division per norm, as a running (Welford) update has.
    double sum = 0.0;
    float lo = norms[0], hi = norms[0];
    for (int i = 0; i < n; ++i) {
        sum += logs[i];
        lo = std::min(lo, norms[i]);
        hi = std::max(hi, norms[i]);
    }
    c.count = n;
    c.mean_log = sum / n;
    for (int i = 0; i < n; ++i) c.m2_log += (logs[i] - c.mean_log) * (logs[i] - c.mean_log);
    c.min_norm = lo;
    c.max_norm = hi;
    return c;
}

void KeyNormObserver::merge(Stats& s, const Stats& c) {
    if (c.count == 0) return;
    if (s.count == 0) {
        s = c;
        return;
    }
    // Chan, Golub and LeVeque's pairwise update of the mean and the sum of squared deviations:
    // n = n_a + n_b, d = mean_b - mean_a, mean = mean_a + d n_b / n,
    // M2 = M2_a + M2_b + d^2 n_a n_b / n.
    const double na = static_cast<double>(s.count), nb = static_cast<double>(c.count);
    const double n = na + nb, delta = c.mean_log - s.mean_log;
    s.mean_log += delta * nb / n;
    s.m2_log += c.m2_log + delta * delta * na * nb / n;
    s.count += c.count;
    s.min_norm = std::min(s.min_norm, c.min_norm);
    s.max_norm = std::max(s.max_norm, c.max_norm);
}

bool KeyNormObserver::in_tail(const Stats& s, double log_norm, double spread) const {
    return s.count >= min_count_ && std::fabs(log_norm - s.mean_log) > spread;
}

void KeyNormObserver::observe(int layer, int head, const float* norms, int n) {
    std::vector<double> logs(n);
    for (int i = 0; i < n; ++i) logs[i] = log_norm(norms[i]);
    const Stats chunk = chunk_stats(norms, logs.data(), n);
    std::lock_guard<std::mutex> lock(mutex_);
    merge(stats_[{layer, head}], chunk);
}

bool KeyNormObserver::is_outlier(int layer, int head, float norm) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = stats_.find({layer, head});
    return it != stats_.end() &&
           in_tail(it->second, log_norm(norm), z_threshold_ * it->second.std_log());
}

void KeyNormObserver::observe_and_flag(int layer, int head, const float* norms, int n,
                                       uint8_t* flags) {
    std::vector<double> logs(n);  // each log once, and the chunk's statistics, outside the lock
    for (int i = 0; i < n; ++i) logs[i] = log_norm(norms[i]);
    const Stats chunk = chunk_stats(norms, logs.data(), n);
    Stats s;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        Stats& held = stats_[{layer, head}];
        merge(held, chunk);
        s = held;
    }
    const double spread = z_threshold_ * s.std_log();
    for (int t = 0; t < n; ++t) flags[t] = in_tail(s, logs[t], spread) ? 1 : 0;
}

void KeyNormObserver::observe_and_flag_heads(int layer, int heads, const float* norms, int n,
                                             uint8_t* flags) {
    ParallelErrors errors;
#pragma omp parallel for schedule(static) if (heads > 1 && n >= kParallelTokens)
    for (int h = 0; h < heads; ++h)
        errors.run(h, [&] {
            const std::size_t at = static_cast<std::size_t>(h) * n;
            observe_and_flag(layer, h, norms + at, n, flags + at);
        });
    errors.rethrow();
}

KeyNormObserver::Stats KeyNormObserver::stats(int layer, int head) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = stats_.find({layer, head});
    return it == stats_.end() ? Stats{} : it->second;
}

void KeyNormObserver::set_stats(int layer, int head, const Stats& stats) {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_[{layer, head}] = stats;
}

void KeyNormObserver::reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.clear();
}

}  // namespace veloxquant
