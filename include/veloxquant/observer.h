// KeyNormObserver: per-(layer, head) statistics of key norms, used to route tokens whose key
// norm lies far out in either tail to a higher-precision side store.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace veloxquant {

/// Large key norms carry large absolute quantization error; very small norms are often
/// attention sinks (Devoto et al., arXiv 2406.11430). Both tails are flagged: a token is an
/// outlier for (layer, head) when |log ||k|| - mean| > z_threshold * std over the norms seen so
/// far (the tokens being appended included), once at least min_count norms were observed.
class KeyNormObserver {
public:
    struct Stats {
        int64_t count = 0;
        double mean_log = 0.0;  ///< mean of log ||k||
        double m2_log = 0.0;    ///< sum of squared deviations of log ||k||
        double min_norm = 0.0;
        double max_norm = 0.0;
        double std_log() const;
        /// max / min norm; above ~2 norms differ enough that mixed precision pays.
        double heterogeneity_ratio() const;
    };

    explicit KeyNormObserver(double z_threshold = 3.0, int64_t min_count = 32);

    double z_threshold() const { return z_threshold_; }
    int64_t min_count() const { return min_count_; }

    /// Adds n norms of (layer, head) to the statistics. Thread-safe.
    void observe(int layer, int head, const float* norms, int n);
    /// True when the norm is in either tail under the current statistics. Thread-safe.
    bool is_outlier(int layer, int head, float norm) const;
    /// observe(layer, head, norms, n), then flags[t] = is_outlier(layer, head, norms[t]) under
    /// the statistics it left (how a cache's append flags its chunk), atomically. Thread-safe:
    /// heads may be flagged from threads of their own (the lock is held for O(1) work).
    void observe_and_flag(int layer, int head, const float* norms, int n, uint8_t* flags);
    /// observe_and_flag of heads 0 .. heads - 1: norms and flags [heads][n]. Chunks of at least
    /// kParallelTokens take a thread a head (OpenMP); the flags and statistics are the same.
    void observe_and_flag_heads(int layer, int heads, const float* norms, int n, uint8_t* flags);
    static constexpr int kParallelTokens = 256;
    Stats stats(int layer, int head) const;
    /// Replaces the statistics of (layer, head), e.g. when a saved cache is loaded.
    void set_stats(int layer, int head, const Stats& stats);
    void reset();

private:
    /// log ||k||, a zero norm clamped to 1e-30.
    static double log_norm(float norm);
    /// The statistics of n norms alone (their logs given).
    static Stats chunk_stats(const float* norms, const double* logs, int n);
    /// s becomes the statistics of its norms and c's.
    static void merge(Stats& s, const Stats& c);
    /// Whether a norm of this log is an outlier under s, spread = z_threshold * s.std_log().
    bool in_tail(const Stats& s, double log_norm, double spread) const;

    double z_threshold_;
    int64_t min_count_;
    mutable std::mutex mutex_;
    std::map<std::pair<int, int>, Stats> stats_;
};

}  // namespace veloxquant
