#include "veloxquant/observer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

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

void KeyNormObserver::add_norms(Stats& s, const float* norms, int n) {
    for (int i = 0; i < n; ++i) {
        const double norm = norms[i];
        // log of a zero norm is -inf; clamp to the smallest positive float so it stays counted
        // (and flagged: a zero key is as far in the low tail as a key can be).
        const double x = std::log(std::max(norm, 1e-30));
        if (s.count == 0) {
            s.min_norm = s.max_norm = norm;
        } else {
            s.min_norm = std::min(s.min_norm, norm);
            s.max_norm = std::max(s.max_norm, norm);
        }
        ++s.count;
        const double delta = x - s.mean_log;
        s.mean_log += delta / static_cast<double>(s.count);
        s.m2_log += delta * (x - s.mean_log);
    }
}

bool KeyNormObserver::in_tail(const Stats& s, float norm) const {
    if (s.count < min_count_) return false;
    const double x = std::log(std::max(static_cast<double>(norm), 1e-30));
    return std::fabs(x - s.mean_log) > z_threshold_ * s.std_log();
}

void KeyNormObserver::observe(int layer, int head, const float* norms, int n) {
    std::lock_guard<std::mutex> lock(mutex_);
    add_norms(stats_[{layer, head}], norms, n);
}

bool KeyNormObserver::is_outlier(int layer, int head, float norm) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = stats_.find({layer, head});
    return it != stats_.end() && in_tail(it->second, norm);
}

void KeyNormObserver::observe_and_flag(int layer, int head, const float* norms, int n,
                                       uint8_t* flags) {
    std::lock_guard<std::mutex> lock(mutex_);
    Stats& s = stats_[{layer, head}];
    add_norms(s, norms, n);
    for (int t = 0; t < n; ++t) flags[t] = in_tail(s, norms[t]) ? 1 : 0;
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
