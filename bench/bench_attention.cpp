// Decode attention and append time per method at 1K-32K cached tokens, and a causal prefill
// chunk of kChunk queries per head after 1K and 8K cached tokens (as a long prompt fed in chunks
// meets it), against dense float32 attention on the same data in the same run, and the read
// bandwidth of the same threads (memory/read_f32: a sum over 256 MiB) as the bound a memory-bound
// decode would reach. Run through bench/run_cpu_bench.sh, which writes the JSON and a summary with
// ratios to bench/results/.
#include <benchmark/benchmark.h>

#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attention/dense_attention.h"
#include "calibration/calibrate.h"
#include "veloxquant/calibration.h"
#include "veloxquant/veloxquant.h"

namespace {

using namespace veloxquant;

constexpr int kHeads = 8, kGroup = 4, kDim = 128;
constexpr int kChunk = 256;  ///< a prefill chunk: the CLI's default --batch

struct Data {
    std::vector<float> k, v, q;
};

const Data& data(int n) {
    static std::map<int, Data> cache;
    auto it = cache.find(n);
    if (it != cache.end()) return it->second;
    std::mt19937_64 gen(n);
    std::normal_distribution<float> normal;
    Data d;
    d.k.resize(static_cast<std::size_t>(kHeads) * n * kDim);
    d.v.resize(d.k.size());
    d.q.resize(static_cast<std::size_t>(kHeads) * kGroup * kChunk * kDim);
    for (auto& x : d.k) x = normal(gen);
    for (auto& x : d.v) x = normal(gen);
    for (auto& x : d.q) x = normal(gen);
    return cache.emplace(n, std::move(d)).first->second;
}

// What a user's calibration run would collect from the model, drawn like the benchmark's data
// but on its own seed: per KV head, kCalibrationRows keys and as many queries of its group (no
// RoPE, as the data has none).
Activations calibration_activations() {
    constexpr int kCalibrationRows = 4096;
    std::mt19937_64 gen(0xCA11B);
    std::normal_distribution<float> normal;
    Activations acts;
    acts.layers.resize(1);
    for (int h = 0; h < kHeads; ++h) {
        HeadSamples keys{kDim, std::vector<float>(kCalibrationRows * kDim), {}};
        HeadSamples queries{kDim, std::vector<float>(kCalibrationRows * kDim), {}};
        for (auto& x : keys.data) x = normal(gen);
        for (auto& x : queries.data) x = normal(gen);
        acts.layers[0].values.push_back(keys);
        acts.layers[0].keys.push_back(std::move(keys));
        acts.layers[0].queries.push_back(std::move(queries));
    }
    return acts;
}

// Each variant's config, calibrated once (spectral, commvq and vecinfer cannot serve without a
// calibration) through calibrate_method and apply_calibration, as `veloxquant calibrate` does.
const KVCacheConfig& config_for(const std::string& name) {
    static std::map<std::string, KVCacheConfig> configs;
    auto it = configs.find(name);
    if (it != configs.end()) return it->second;
    KVCacheConfig c;
    c.method = name;
    if (name == "turboquant_rvq_b4") {
        c.method = "turboquant_rvq";
        c.bits = 4;
        c.num_residuals = 1;
        c.value_bits = 4;
    }
    if (name == "qjl_m256") {  // 2 sign bits per coordinate at d=128, 4-bit values
        c.method = "qjl";
        c.sketch_dim = 256;
        c.value_bits = 4;
    }
    if (name == "rabitq_b2" || name == "rabitq_b4") {  // extended codes, 2- and 4-bit values
        c.method = "rabitq";
        c.bits = c.value_bits = name == "rabitq_b2" ? 2 : 4;
    }
    if (name == "vecinfer_b4") {  // 256 codewords of 2 coordinates: a byte a pair, 4-bit values
        c.method = "vecinfer";
        c.bits = c.value_bits = 4;
    }
    if (name == "spectral_b4") {  // compare's ~4.4-bit setting: 5 signal, 3 noise bits
        c.method = "spectral";
        c.signal_bits = 5;
        c.noise_bits = 3;
        c.value_bits = 4;
    }
    if (name == "polarquant_b4") {  // 6-bit level-1 angles (64-entry tables), 4-bit values
        c.method = "polarquant";
        c.bits = c.value_bits = 4;
    }
    // commvq_rope: the same codebook with the cache told the RoPE frequencies (base 10000), so
    // keys are coded before RoPE and scores turn by each token's position.
    if (name == "commvq_rope") c.method = "commvq";
    if (name == "commvq_rope_b4") {  // 4 stages of 256 codewords, 4-bit values
        c.method = "commvq";
        c.bits = c.value_bits = 4;
    }
    if (c.method == "spectral" || c.method == "commvq" || c.method == "vecinfer") {
        Calibration cal;
        calibrate_method(calibration_activations(), c, cal);
        apply_calibration(cal, c);
    }
    // turboquant_rvq's defaults coding keys minus their RoPE-following mean (center_keys).
    if (name == "centred_tq") {
        c.method = "turboquant_rvq";
        c.center_keys = true;
    }
    if (name == "commvq_rope" || name == "commvq_rope_b4" || c.center_keys)
        for (int i = 0; i < kDim / 2; ++i)
            c.rope_inv_freq.push_back(std::pow(10000.0, -2.0 * i / kDim));
    return configs.emplace(name, std::move(c)).first->second;
}

const std::vector<std::string> kVariants = {
    "fp16",        "turboquant_rvq", "turboquant_rvq_b4", "qjl",
    "qjl_m256",    "polarquant",     "polarquant_b4",     "rabitq",
    "rabitq_b2",   "rabitq_b4",      "ratequant",         "spectral",
    "spectral_b4", "commvq",         "commvq_rope",       "commvq_rope_b4",
    "vecinfer",    "vecinfer_b4",    "centred_tq"};

void BM_dense_decode(benchmark::State& state) {
    const int n = static_cast<int>(state.range(0));
    const Data& d = data(n);
    std::vector<float> out(d.q.size());
    for (auto _ : state) {
        dense_attention(d.q.data(), kHeads * kGroup, 1, d.k.data(), d.v.data(), kHeads, n, kDim,
                        out.data(), 0.088f, false);
        benchmark::DoNotOptimize(out.data());
    }
    const double bytes = 2.0 * kHeads * n * kDim * sizeof(float);
    state.counters["kv_bytes"] = bytes;
    state.counters["GB/s"] =
        benchmark::Counter(bytes * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}

// A causal chunk of kChunk queries per query head at the end of n + kChunk tokens (data(n +
// kChunk)'s first queries), dense: the bound the compressed caches' prefill is held against.
void BM_dense_prefill(benchmark::State& state) {
    const int n = static_cast<int>(state.range(0)) + kChunk;
    const Data& d = data(n);
    std::vector<float> out(static_cast<std::size_t>(kHeads) * kGroup * kChunk * kDim);
    for (auto _ : state) {
        dense_attention(d.q.data(), kHeads * kGroup, kChunk, d.k.data(), d.v.data(), kHeads, n,
                        kDim, out.data(), 0.088f, true);
        benchmark::DoNotOptimize(out.data());
    }
    state.counters["queries/s"] =
        benchmark::Counter(static_cast<double>(kHeads) * kGroup * kChunk * state.iterations(),
                           benchmark::Counter::kIsRate);
}

// Sums state.range(0) MiB of floats over OpenMP threads, eight independent accumulators each.
void BM_read(benchmark::State& state) {
    static std::vector<float> buffer;
    const std::size_t n = static_cast<std::size_t>(state.range(0)) << 18;  // MiB -> floats
    if (buffer.size() != n) buffer.assign(n, 1.0f);
    for (auto _ : state) {
        double total = 0.0;
#pragma omp parallel for reduction(+ : total) schedule(static)
        for (std::size_t i = 0; i < n; i += 1024) {
            float acc[8] = {};
            for (std::size_t j = i; j < i + 1024 && j < n; j += 8)
                for (int k = 0; k < 8; ++k) acc[k] += buffer[j + k];
            for (float a : acc) total += a;
        }
        benchmark::DoNotOptimize(total);
    }
    state.counters["GB/s"] =
        benchmark::Counter(static_cast<double>(n) * sizeof(float) * state.iterations() / 1e9,
                           benchmark::Counter::kIsRate);
}

void BM_decode(benchmark::State& state, const std::string& variant) {
    const int n = static_cast<int>(state.range(0));
    const Data& d = data(n);
    auto cache = KVCacheFactory::create(config_for(variant), kHeads, kDim, n);
    cache->append(d.k.data(), d.v.data(), n);
    std::vector<float> out(d.q.size());
    for (auto _ : state) {
        cache->attend(d.q.data(), kHeads * kGroup, 1, out.data(), 0.088f, false);
        benchmark::DoNotOptimize(out.data());
    }
    const double bytes =
        static_cast<double>(static_cast<QuantizedKVCache&>(*cache).storage_bytes());
    state.counters["kv_bytes"] = bytes;
    state.counters["GB/s"] =
        benchmark::Counter(bytes * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}

// The same chunk through a cache holding the n + kChunk tokens (the chunk's own tokens appended
// before its attention, as a model layer does).
void BM_prefill(benchmark::State& state, const std::string& variant) {
    const int n = static_cast<int>(state.range(0)) + kChunk;
    const Data& d = data(n);
    auto cache = KVCacheFactory::create(config_for(variant), kHeads, kDim, n);
    cache->append(d.k.data(), d.v.data(), n);
    std::vector<float> out(static_cast<std::size_t>(kHeads) * kGroup * kChunk * kDim);
    for (auto _ : state) {
        cache->attend(d.q.data(), kHeads * kGroup, kChunk, out.data(), 0.088f, true);
        benchmark::DoNotOptimize(out.data());
    }
    state.counters["queries/s"] =
        benchmark::Counter(static_cast<double>(kHeads) * kGroup * kChunk * state.iterations(),
                           benchmark::Counter::kIsRate);
}

void BM_append(benchmark::State& state, const std::string& variant) {
    const int n = static_cast<int>(state.range(0));
    const Data& d = data(n);
    for (auto _ : state) {
        state.PauseTiming();
        auto cache = KVCacheFactory::create(config_for(variant), kHeads, kDim, n);
        state.ResumeTiming();
        cache->append(d.k.data(), d.v.data(), n);
        benchmark::DoNotOptimize(cache.get());
    }
    state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(n) * state.iterations(),
                                                    benchmark::Counter::kIsRate);
}

const int registered = [] {
    benchmark::RegisterBenchmark("memory/read_f32", BM_read)
        ->Arg(256)
        ->Unit(benchmark::kMicrosecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark("decode/dense_f32", BM_dense_decode)
        ->RangeMultiplier(4)
        ->Range(1024, 32768)
        ->Unit(benchmark::kMicrosecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark("prefill/dense_f32", BM_dense_prefill)
        ->Arg(1024)
        ->Arg(8192)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    for (const auto& v : kVariants) {
        benchmark::RegisterBenchmark(("prefill/" + v).c_str(), BM_prefill, v)
            ->Arg(1024)
            ->Arg(8192)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
        benchmark::RegisterBenchmark(("decode/" + v).c_str(), BM_decode, v)
            ->RangeMultiplier(4)
            ->Range(1024, 32768)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
        benchmark::RegisterBenchmark(("append/" + v).c_str(), BM_append, v)
            ->Arg(1024)
            ->Arg(8192)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime()
            ->Iterations(3);
    }
    return 0;
}();

}  // namespace

BENCHMARK_MAIN();
