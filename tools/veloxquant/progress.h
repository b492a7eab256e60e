// A one-line progress bar on stderr: label, bar, percentage, done/total, rate and ETA, redrawn
// at most ten times a second. Silent when stderr is not a terminal or when quiet.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

namespace veloxquant::cli {

class Progress {
public:
    Progress(std::string label, int64_t total, std::string unit, bool quiet)
        : label_(std::move(label)),
          unit_(std::move(unit)),
          total_(std::max<int64_t>(total, 1)),
          enabled_(!quiet && isatty(fileno(stderr))),
          start_(Clock::now()),
          last_draw_(start_) {}
    ~Progress() { finish(); }
    Progress(const Progress&) = delete;
    Progress& operator=(const Progress&) = delete;

    /// Adds `n` units of work done.
    void advance(int64_t n) {
        done_ = std::min(done_ + n, total_);
        const auto now = Clock::now();
        if (done_ < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
        last_draw_ = now;
        draw(now);
    }

    /// Draws the final state and ends the line (once).
    void finish() {
        if (!enabled_ || finished_) return;
        finished_ = true;
        draw(Clock::now());
        std::fputc('\n', stderr);
    }

private:
    using Clock = std::chrono::steady_clock;

    static std::string clock_text(double seconds) {
        const long s = static_cast<long>(seconds + 0.5);
        char buf[32];
        if (s >= 3600)
            std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
        else
            std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
        return buf;
    }

    void draw(Clock::time_point now) const {
        if (!enabled_) return;
        constexpr int kWidth = 28;
        const double frac = static_cast<double>(done_) / static_cast<double>(total_);
        const double elapsed = std::chrono::duration<double>(now - start_).count();
        const double rate = elapsed > 0 ? static_cast<double>(done_) / elapsed : 0.0;
        const std::string eta =
            rate > 0 ? clock_text(static_cast<double>(total_ - done_) / rate) : "--:--";
        const int filled = static_cast<int>(frac * kWidth);
        std::string bar(static_cast<std::size_t>(filled), '#');
        bar.resize(kWidth, '.');
        std::fprintf(stderr, "\r\033[K%s [%s] %5.1f%% %lld/%lld %s, %.1f %s/s, ETA %s",
                     label_.c_str(), bar.c_str(), 100.0 * frac, static_cast<long long>(done_),
                     static_cast<long long>(total_), unit_.c_str(), rate, unit_.c_str(),
                     eta.c_str());
        std::fflush(stderr);
    }

    std::string label_;
    std::string unit_;
    int64_t total_;
    int64_t done_ = 0;
    bool enabled_;
    bool finished_ = false;
    Clock::time_point start_;
    Clock::time_point last_draw_;
};

}  // namespace veloxquant::cli
