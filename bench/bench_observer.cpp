// What the outlier observer costs an append on the host: 131072 tokens x 8 KV heads of key norms
// (log-normal, sigma 0.5) in chunks of 4096, flagged by KeyNormObserver::observe_and_flag (one
// lock a chunk, each log once: QuantizedKVCache::append and the device cache's append since
// session 2026-12-06d) against observe() then is_outlier() per token (the CPU cache's append
// before it: a lock and a log per token). Both flag the same tokens. Usage: bench_observer
// [Google Benchmark flags], e.g. --benchmark_repetitions=5 --benchmark_report_aggregates_only=true.
#include <benchmark/benchmark.h>

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

BENCHMARK(BM_observe_and_flag)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_observe_then_is_outlier)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
