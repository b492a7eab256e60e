// What the outlier observer costs an append on the host: 131072 tokens x 8 KV heads of key norms
// (log-normal, sigma 0.5) in chunks of 4096, flagged by KeyNormObserver::observe_and_flag (one
// lock a chunk, each log once, since session 2026-12-06e the chunk's statistics merged into the
// running ones in O(1)) head after head, by observe_and_flag_heads (every head of a chunk, a
// thread a head: how QuantizedKVCache::append and the device cache's append call it since
// session 2026-12-06e), and by observe() then is_outlier() per token (the CPU cache's append
// before session 2026-12-06d: a lock and a log per token). All flag the same tokens. Usage:
// bench_observer [Google Benchmark flags], e.g. --benchmark_repetitions=5
// --benchmark_report_aggregates_only=true (OMP_NUM_THREADS bounds the heads' threads).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "veloxquant/observer.h"

namespace {

using veloxquant::KeyNormObserver;

constexpr int kHeads = 8, kTokens = 131072, kChunk = 4096;

const std::vector<float>& norms() {  // [kTokens]
    static const std::vector<float> n = [] {
        std::mt19937 gen(1);
        std::lognormal_distribution<float> lognormal(0.0f, 0.5f);
        std::vector<float> v(kTokens);
        for (float& x : v) x = lognormal(gen);
        return v;
    }();
    return n;
}

// Runs flag_chunk(observer, head, chunk start, flags) over every chunk of every head with a
// fresh observer per iteration; reports the tokens flagged.
template <class FlagChunk>
void run_chunks(benchmark::State& state, FlagChunk flag_chunk) {
    std::vector<uint8_t> flags(kChunk);
    long long flagged = 0;
    for (auto _ : state) {
        KeyNormObserver observer(3.0, 32);
        flagged = 0;
        for (int h = 0; h < kHeads; ++h)
            for (int c = 0; c < kTokens; c += kChunk) {
                flag_chunk(observer, h, norms().data() + c, flags.data());
                for (const uint8_t f : flags) flagged += f;
            }
    }
    state.counters["flagged"] = static_cast<double>(flagged);
}

void BM_observe_and_flag(benchmark::State& state) {
    run_chunks(state, [](KeyNormObserver& o, int h, const float* n, uint8_t* flags) {
        o.observe_and_flag(0, h, n, kChunk, flags);
    });
}

void BM_observe_then_is_outlier(benchmark::State& state) {
    run_chunks(state, [](KeyNormObserver& o, int h, const float* n, uint8_t* flags) {
        o.observe(0, h, n, kChunk);
        for (int t = 0; t < kChunk; ++t) flags[t] = o.is_outlier(0, h, n[t]) ? 1 : 0;
    });
}

void BM_observe_and_flag_heads(benchmark::State& state) {
    std::vector<float> chunked(static_cast<std::size_t>(kHeads) * kTokens);  // [chunk][head][t]
    for (int c = 0; c < kTokens; c += kChunk)
        for (int h = 0; h < kHeads; ++h)
            std::copy(norms().begin() + c, norms().begin() + c + kChunk,
                      chunked.begin() + static_cast<std::size_t>(c) * kHeads + h * kChunk);
    std::vector<uint8_t> flags(static_cast<std::size_t>(kHeads) * kChunk);
    long long flagged = 0;
    for (auto _ : state) {
        KeyNormObserver observer(3.0, 32);
        flagged = 0;
        for (int c = 0; c < kTokens; c += kChunk) {
            observer.observe_and_flag_heads(0, kHeads,
                                            chunked.data() + static_cast<std::size_t>(c) * kHeads,
                                            kChunk, flags.data());
            for (const uint8_t f : flags) flagged += f;
        }
    }
    state.counters["flagged"] = static_cast<double>(flagged);
}

BENCHMARK(BM_observe_and_flag)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_observe_and_flag_heads)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_observe_then_is_outlier)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
