// What a rabitq cache's first prefill costs on the host, per layer of 8 KV heads at d=128: the
// k-means assignment (the AVX2 path chosen at run time against the portable distances it
// reproduces bit for bit), one head's k-means, every head's training (train_key_codecs, heads in
// parallel) on the 2048 rows per head it reads. (The device backend's affine query-state
// measurement, timed here on the host until session 2026-12-06l, runs its probes on the device
// since: affine_state_device.cuh.) Usage: bench_training [Google Benchmark flags], e.g.
// --benchmark_repetitions=5 --benchmark_report_aggregates_only=true.
#include <benchmark/benchmark.h>

#include <memory>
#include <random>
#include <vector>

#include "core/kmeans.h"
#include "methods/key_codec.h"
#include "veloxquant/config.h"

namespace {

using namespace veloxquant;

constexpr int kHeads = 8, kDim = 128, kClusters = 64, kRows = 32 * kClusters;

const std::vector<float>& rows() {  // [kHeads][kRows][kDim]
    static const std::vector<float> r = [] {
        std::mt19937_64 gen(7);
        std::normal_distribution<float> normal;
        std::vector<float> v(static_cast<std::size_t>(kHeads) * kRows * kDim);
        for (float& x : v) x = normal(gen);
        return v;
    }();
    return r;
}

std::vector<std::unique_ptr<KeyCodec>> rabitq_heads() {
    KVCacheConfig c;
    c.method = "rabitq";
    c.bits = 3;
    c.num_clusters = kClusters;
    std::vector<std::unique_ptr<KeyCodec>> heads;
    for (int h = 0; h < kHeads; ++h) heads.push_back(make_key_codec(c, kDim, 0, h));
    return heads;
}

// One k-means assignment pass: every row of one head against 64 centroids, by the portable
// nearest_centroid or by the host's CentroidSearch on the CPU kernel set in use (VQ_CPU_ISA).
template <class Search>
void BM_assign(benchmark::State& state) {
    const float* x = rows().data();
    const Search search(x, kClusters, kDim);  // the first 64 rows as centroids
    for (auto _ : state) {
        int sum = 0;
        for (int i = 0; i < kRows; ++i)
            sum += search.nearest(x + static_cast<std::size_t>(i) * kDim);
        benchmark::DoNotOptimize(sum);
    }
}

struct PortableSearch {
    const float* centroids;
    int k, d;
    PortableSearch(const float* c, int k_, int d_) : centroids(c), k(k_), d(d_) {}
    int nearest(const float* x) const { return nearest_centroid(x, centroids, k, d); }
};

void BM_kmeans_one_head(benchmark::State& state) {
    for (auto _ : state) {
        KMeansResult r = kmeans(rows().data(), kRows, kDim, kClusters, 5);
        benchmark::DoNotOptimize(r.centroids.data());
    }
}

void BM_train_heads(benchmark::State& state) {
    for (auto _ : state) {
        state.PauseTiming();
        auto heads = rabitq_heads();
        state.ResumeTiming();
        train_key_codecs(heads, rows().data(), kRows);
        benchmark::DoNotOptimize(heads.data());
    }
}

BENCHMARK(BM_assign<PortableSearch>)->Name("assign/portable")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_assign<CentroidSearch>)->Name("assign/host")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_kmeans_one_head)->Name("kmeans/one_head")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_train_heads)->Name("train/8_heads")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
