#include "veloxquant/observer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

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

void KeyNormObserver::add_norms(Stats& s, const float* norms, const double* logs, int n) {
    for (int i = 0; i < n; ++i) {
        const double norm = norms[i], x = logs[i];
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

bool KeyNormObserver::in_tail(const Stats& s, double log_norm, double spread) const {
    return s.count >= min_count_ && std::fabs(log_norm - s.mean_log) > spread;
}

void KeyNormObserver::observe(int layer, int head, const float* norms, int n) {
    std::vector<double> logs(n);
    for (int i = 0; i < n; ++i) logs[i] = log_norm(norms[i]);
    std::lock_guard<std::mutex> lock(mutex_);
    add_norms(stats_[{layer, head}], norms, logs.data(), n);
}

bool KeyNormObserver::is_outlier(int layer, int head, float norm) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = stats_.find({layer, head});
    return it != stats_.end() &&
           in_tail(it->second, log_norm(norm), z_threshold_ * it->second.std_log());
}

void KeyNormObserver::observe_and_flag(int layer, int head, const float* norms, int n,
                                       uint8_t* flags) {
    std::vector<double> logs(n);  // each log once, outside the lock
    for (int i = 0; i < n; ++i) logs[i] = log_norm(norms[i]);
    std::lock_guard<std::mutex> lock(mutex_);
    Stats& s = stats_[{layer, head}];
    add_norms(s, norms, logs.data(), n);
    const double spread = z_threshold_ * s.std_log();
    for (int t = 0; t < n; ++t) flags[t] = in_tail(s, logs[t], spread) ? 1 : 0;
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
