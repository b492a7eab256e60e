// Times the fused CUDA decode attention on turboquant_rvq codes: batch B in {1, 8, 32}
// independent sequences of N in {8K, 32K, 128K} tokens, 32 query heads over 8 KV heads, head dim
// 128 and 64; a device-to-device copy measured in the same process as the bandwidth reference;
// and the encode throughput. Usage: bench_cuda_attention OUT.json [METHOD:D:B:N] (the optional
// filter times the points whose key starts with it, e.g. one point for a profiler, or "k4v4:").
// VQ_TABLE_COPIES=1|16|32 fixes the lane copies of the 4-bit tables, VQ_RING=1..4 the pages per
// warp in shared memory, VQ_SPLITS=n the splits of each sequence's pages, or VQ_SPLIT_PAGES=b and
// VQ_TAIL_PAGES=c splits of b pages then of c (DecodeArgs::split_pages), instead of the plan's
// choice. VQ_GROUP=1..8 sets the query heads per KV head (default 4: 32 query heads; 8 is
// Llama-3-70B's 64 over 8). VQ_CHAIN=k captures k decodes (each on the next rotation's page
// tables) in one graph and reports the time per decode: one graph's launch spread over k decodes,
// as a model's decode step runs its layers in one graph (default 1: a graph a decode). VQ_GRAPH=0
// times the same decodes launched on the stream one by one (launch_decode_attention, as the API
// calls it) instead of as graphs. VQ_PAGE_EVICTION=1|2 forces the L2 policy of the page copies
// (1 normal, 2 evict-first; DecodeArgs::page_eviction) instead of the plan's choice.
// VQ_CENTER=1 times centred keys' decodes (center_keys, Llama's RoPE over the head): each decode
// also launches the page bias kernel (KeyCenter::page_bias) from a random key mean and reads its
// bias, as CudaTurboQuantCache::attend does.
//
// Pages are filled by encoding 8K random tokens and replicating their pages; every timed launch
// reads a different region of a pool larger than the L2 cache (page tables rotate: each of the
// 60 timed launches its own region, or regions larger than the L2 where the pool holds fewer),
// so that no decode finds its pages in the L2, as none does in a model; and each decode is one
// CUDA graph (split-K kernel + merge) timed with events; medians are reported. Each timed point
// and encode starts after a rest: the benchmark waits until the SM clock is back at the one the
// copy measurement ran at (rest_until_clock, up to VQ_REST_MS, default 250: after sustained load
// the clock climbs back to its plateau in about 120 ms) and records the clock before and after
// the timed launches.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "cuda/cuda_cache.h"
#include "cuda/key_center.h"
#include "veloxquant/config.h"

using namespace veloxquant;
using namespace veloxquant::cuda;
using namespace vqbench;

namespace {

constexpr int kKvHeads = 8, kMaxQHeads = 8 * kKvHeads, kPage = 64;
constexpr int kMaxBatch = 32, kMaxTokens = 131072;
constexpr int kTimedLaunches = 60;  // a point's median is over these

struct Method {
    const char* name;
    int bits, stages, value_bits;
};
const Method kMethods[] = {{"k1v2", 1, 1, 2}, {"k4v4", 4, 1, 4}, {"k2x2v4", 2, 2, 4}};

struct Point {
    std::string method;
    int d, batch, tokens, splits;
    double ms, ms_min, bytes, gbps;
    bool finite;
    double rest_ms, start_mhz;  // the rest before the timed launches, the SM clock after it
    double sm_mhz;              // the SM clock right after the timed launches
};

struct Encode {
    std::string method;
    int d, tokens;
    double ms, bytes, gbps, tokens_per_s;
    double rest_ms, start_mhz, sm_mhz;
};

// An integer setting from the environment, or `fallback` where it is not set.
int env_int(const char* name, int fallback) {
    const char* value = std::getenv(name);
    return value != nullptr ? std::atoi(value) : fallback;
}

}  // namespace

int run(const char* out_path, const std::string& only) {
    const int table_copies = env_int("VQ_TABLE_COPIES", 0), ring = env_int("VQ_RING", 0);
    const int splits = env_int("VQ_SPLITS", 0), split_pages = env_int("VQ_SPLIT_PAGES", 0);
    const int tail_pages = env_int("VQ_TAIL_PAGES", 0), max_rest_ms = env_int("VQ_REST_MS", 250);
    const int group = env_int("VQ_GROUP", 4), q_heads = group * kKvHeads;
    const int chain = env_int("VQ_CHAIN", 1), use_graphs = env_int("VQ_GRAPH", 1) != 0;
    const int page_eviction = env_int("VQ_PAGE_EVICTION", 0);
    const bool centred = env_int("VQ_CENTER", 0) != 0;
    if (chain < 1 || chain > 64) {
        std::fprintf(stderr, "VQ_CHAIN=%d: decodes per graph must be 1..64\n", chain);
        return 1;
    }
    if (q_heads < 1 || q_heads > kMaxQHeads) {
        std::fprintf(stderr, "VQ_GROUP=%d: query heads per KV head must be 1..8\n", group);
        return 1;
    }
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, 0), "properties");
    std::printf("device %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
                prop.l2CacheSize >> 20);

    // Copy bandwidth: bytes read plus bytes written per second, 2 GiB buffers.
    const size_t copy_bytes = size_t(2) << 30;
    void *src = nullptr, *dst = nullptr;
    check_cuda(cudaMalloc(&src, copy_bytes), "malloc");
    check_cuda(cudaMalloc(&dst, copy_bytes), "malloc");
    check_cuda(cudaMemset(src, 1, copy_bytes), "memset");
    for (int i = 0; i < 3; ++i)
        check_cuda(cudaMemcpy(dst, src, copy_bytes, cudaMemcpyDeviceToDevice), "copy");
    const auto copy_ms =
        time_ms(20, [&](int) { cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice); });
    const double copy_gbps = 2.0 * copy_bytes / (median(copy_ms) * 1e-3) / 1e9;
    const double copy_mhz = sm_clock_mhz();
    std::printf("device copy: %.1f GB/s (read + write), SM clock %.0f MHz\n", copy_gbps, copy_mhz);
    // The rest before a timed loop, and the SM clock when it ends
    auto rest = [&](double& rest_ms, double& start_mhz) {
        rest_ms = max_rest_ms > 0 ? rest_until_clock(copy_mhz, max_rest_ms) : 0.0;
        start_mhz = sm_clock_mhz();
    };
    cudaFree(src);
    cudaFree(dst);

    // One pool for every method, sized for the widest pages at B = 32, N = 128K.
    size_t max_page_bytes = 0;
    for (int d : {128, 64})
        for (const Method& m : kMethods) {
            KVCacheConfig c;
            c.method = "turboquant_rvq", c.bits = m.bits, c.num_residuals = m.stages,
            c.value_bits = m.value_bits;
            max_page_bytes = std::max<size_t>(
                max_page_bytes, make_host_tables(c, kKvHeads, d, 0).layout.page_bytes);
        }
    const int pool_pages = kMaxBatch * kMaxTokens / kPage;
    uint8_t* pool = nullptr;
    check_cuda(cudaMalloc(&pool, pool_pages * max_page_bytes), "malloc(pool)");
    const int seed_tokens = 8192, seed_pages = seed_tokens / kPage;
    const int enc_tokens = 131072;  // a 128K-token prefill's keys and values, encoded at once
    float *keys = nullptr, *values = nullptr, *queries = nullptr, *out = nullptr;
    check_cuda(cudaMalloc(&keys, size_t(kKvHeads) * enc_tokens * 128 * sizeof(float)), "malloc");
    check_cuda(cudaMalloc(&values, size_t(kKvHeads) * enc_tokens * 128 * sizeof(float)), "malloc");
    check_cuda(cudaMalloc(&queries, size_t(kMaxBatch) * kMaxQHeads * 128 * sizeof(float)),
               "malloc");
    check_cuda(cudaMalloc(&out, size_t(kMaxBatch) * kMaxQHeads * 128 * sizeof(float)), "malloc");
    int32_t* tables = nullptr;  // the rotations' page tables, at most one entry per pool page
    check_cuda(cudaMalloc(&tables, size_t(pool_pages) * sizeof(int32_t)), "malloc");
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
    cudaStream_t stream;
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");

    std::vector<Point> points;
    std::vector<Encode> encodes;
    for (int d : {128, 64}) {
        fill(keys, size_t(kKvHeads) * enc_tokens * d, 1 + d);
        fill(values, size_t(kKvHeads) * enc_tokens * d, 2 + d);
        fill(queries, size_t(kMaxBatch) * q_heads * d, 3 + d);
        for (const Method& m : kMethods) {
            const std::string prefix = std::string(m.name) + ":" + std::to_string(d) + ":";
            auto selected =
                [&](const std::string& key) {  // key is a prefix of a filter or vice versa
                    const size_t n = std::min(key.size(), only.size());
                    return only.empty() || key.compare(0, n, only, 0, n) == 0;
                };
            if (!selected(prefix)) continue;
            KVCacheConfig c;
            c.method = "turboquant_rvq", c.bits = m.bits, c.num_residuals = m.stages,
            c.value_bits = m.value_bits;
            const TqHostTables host = make_host_tables(c, kKvHeads, d, 0);
            const DeviceTables dev(host);
            KVCacheConfig cc = c;  // VQ_CENTER: every sequence centred by one random mean
            cc.center_keys = centred;
            for (int i = 0; i < d / 2; ++i)
                cc.rope_inv_freq.push_back(std::pow(10000.0, -2.0 * i / d));
            cc.rope_half_split = true;
            KeyCenter center(cc, kKvHeads, d);
            if (centred) {
                std::vector<float> mean(size_t(kKvHeads) * d);
                for (size_t i = 0; i < mean.size(); ++i) mean[i] = std::sin(0.37 * i);
                center.set_mean(mean);
            }
            float* bias = nullptr;  // [batch][q_heads][pages]
            const float* const* damped = nullptr;
            const float** damped_array = nullptr;
            if (centred) {
                check_cuda(cudaMalloc(&bias, size_t(kMaxBatch) * q_heads * (kMaxTokens / kPage) *
                                                 sizeof(float)),
                           "malloc(bias)");
                std::vector<const float*> per_sequence(kMaxBatch, center.damped());
                check_cuda(cudaMalloc(&damped_array, kMaxBatch * sizeof(float*)), "malloc");
                check_cuda(cudaMemcpy(damped_array, per_sequence.data(), kMaxBatch * sizeof(float*),
                                      cudaMemcpyHostToDevice),
                           "damped");
                damped = damped_array;
            }
            const TqPageLayout& L = host.layout;

            // Encode throughput: 128K tokens x 8 heads of float32 keys and values into the pool.
            std::vector<int32_t> identity(pool_pages);
            for (int p = 0; p < pool_pages; ++p) identity[p] = p;
            check_cuda(cudaMemcpy(tables, identity.data(), pool_pages * sizeof(int32_t),
                                  cudaMemcpyHostToDevice),
                       "table");
            EncodeArgs e;
            e.layout = L, e.tables = dev.get(), e.pool = pool, e.page_table = tables;
            e.start = 0, e.n_tokens = enc_tokens, e.keys = keys, e.values = values;
            check_cuda(launch_encode(e, nullptr), "encode");
            double enc_rest = 0.0, enc_start = 0.0;
            rest(enc_rest, enc_start);
            const auto enc_ms =
                time_ms(5, [&](int) { check_cuda(launch_encode(e, nullptr), "encode"); });
            const double enc_bytes = double(kKvHeads) * enc_tokens * (2.0 * d * sizeof(float)) +
                                     double(enc_tokens / kPage) * L.page_bytes;
            encodes.push_back({m.name, d, enc_tokens, median(enc_ms), enc_bytes,
                               enc_bytes / (median(enc_ms) * 1e-3) / 1e9,
                               enc_tokens / (median(enc_ms) * 1e-3), enc_rest, enc_start,
                               sm_clock_mhz()});
            std::printf(
                "%-7s d=%3d encode %d tokens: %.3f ms, %.0f GB/s, SM clock %.0f -> %.0f "
                "MHz (rested %.0f ms)\n",
                m.name, d, enc_tokens, median(enc_ms), encodes.back().gbps, enc_start,
                encodes.back().sm_mhz, enc_rest);

            // Fill the pool: the first 8K encoded tokens' pages, replicated.
            for (int p = seed_pages; p < pool_pages; p += seed_pages)
                check_cuda(cudaMemcpyAsync(pool + size_t(p) * L.page_bytes, pool,
                                           size_t(seed_pages) * L.page_bytes,
                                           cudaMemcpyDeviceToDevice, nullptr),
                           "replicate");
            check_cuda(cudaDeviceSynchronize(), "fill");

            for (int batch : {1, 8, 32}) {
                for (int tokens : {8192, 32768, 131072}) {
                    if (!selected(prefix + std::to_string(batch) + ":" + std::to_string(tokens)))
                        continue;
                    const int pages = tokens / kPage;
                    // A rotation for each timed launch where the pool holds that many, so that
                    // no timed decode finds its pages in the L2 (in a model, the weights stream
                    // through it between two decodes of a layer); else each rotation is larger
                    // than the L2 (B = 8 and 32 at 128K: 4 and 1).
                    const int rotations = std::min(kTimedLaunches, pool_pages / (batch * pages));
                    std::vector<int32_t> t(size_t(rotations) * batch * pages);
                    for (size_t i = 0; i < t.size(); ++i)
                        t[i] = static_cast<int32_t>(i % pool_pages);
                    check_cuda(cudaMemcpy(tables, t.data(), t.size() * sizeof(int32_t),
                                          cudaMemcpyHostToDevice),
                               "tables");
                    DecodeArgs a;
                    a.layout = L, a.tables = dev.get(), a.pool = pool, a.page_table = tables,
                    a.page_table_stride = pages;
                    a.seq_len = tokens, a.max_seq_len = tokens, a.batch = batch, a.group = group;
                    a.queries = queries, a.out = out, a.scale = 1.0f / std::sqrt(float(d));
                    a.table_copies = table_copies, a.ring = ring, a.splits = splits;
                    a.split_pages = split_pages, a.tail_pages = tail_pages;
                    a.page_eviction = page_eviction;
                    if (centred) a.page_bias = bias, a.page_bias_stride = pages;
                    const size_t need = decode_workspace_bytes(a);
                    if (need == 0) throw std::runtime_error("no decode plan");
                    if (need > workspace_bytes) {
                        cudaFree(workspace);
                        check_cuda(cudaMalloc(&workspace, need), "workspace");
                        workspace_bytes = need;
                    }
                    a.workspace = workspace;
                    // The decodes of rotations r chain .. r chain + chain - 1 (modulo their
                    // count: the next chain reads other pages), on stream s
                    auto launch_chain = [&](int r, cudaStream_t s) {
                        for (int j = 0; j < chain; ++j) {
                            a.page_table =
                                tables + size_t((r * chain + j) % rotations) * batch * pages;
                            if (centred)
                                center.page_bias(damped, queries, batch, q_heads, nullptr, tokens,
                                                 pages, a.scale, bias, pages, s);
                            check_cuda(launch_decode_attention(a, s), "decode");
                        }
                    };
                    if (centred) center.reserve_pages(pages, stream);  // not while capturing
                    std::vector<cudaGraphExec_t> graphs(rotations);
                    for (int r = 0; r < rotations; ++r) {
                        cudaGraph_t g;
                        check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed),
                                   "capture");
                        launch_chain(r, stream);
                        check_cuda(cudaStreamEndCapture(stream, &g), "capture");
                        check_cuda(cudaGraphInstantiate(&graphs[r], g, 0), "instantiate");
                        cudaGraphDestroy(g);
                    }
                    check_cuda(cudaMemsetAsync(out, 0xff,
                                               size_t(batch) * q_heads * d * sizeof(float), stream),
                               "poison");
                    for (int r = 0; r < rotations; ++r)
                        check_cuda(cudaGraphLaunch(graphs[r], stream), "warm-up");
                    check_cuda(cudaStreamSynchronize(stream), "warm-up");
                    std::vector<float> host_out(size_t(batch) * q_heads * d);
                    check_cuda(cudaMemcpy(host_out.data(), out, host_out.size() * sizeof(float),
                                          cudaMemcpyDeviceToHost),
                               "out");
                    const bool finite = std::all_of(host_out.begin(), host_out.end(),
                                                    [](float x) { return std::isfinite(x); });
                    double rest_ms = 0.0, start_mhz = 0.0;
                    rest(rest_ms, start_mhz);
                    auto ms = time_ms(kTimedLaunches, [&](int r) {
                        if (use_graphs)
                            check_cuda(cudaGraphLaunch(graphs[r % rotations], nullptr), "launch");
                        else
                            launch_chain(r % rotations, nullptr);
                    });
                    for (float& x : ms) x /= chain;  // per decode
                    for (auto& g : graphs) cudaGraphExecDestroy(g);
                    const double bytes = double(batch) * kKvHeads * pages * L.head_bytes;
                    points.push_back({m.name, d, batch, tokens, decode_splits(a), median(ms),
                                      ms.front(), bytes, bytes / (median(ms) * 1e-3) / 1e9, finite,
                                      rest_ms, start_mhz, sm_clock_mhz()});
                    const Point& p = points.back();
                    std::printf(
                        "%-7s d=%3d B=%2d N=%6d: %.4f ms  %.0f GB/s  %.2f of copy  %.0f -> "
                        "%.0f MHz (rested %.0f ms, %d splits)%s\n",
                        m.name, d, batch, tokens, p.ms, p.gbps, p.gbps / copy_gbps, p.start_mhz,
                        p.sm_mhz, p.rest_ms, p.splits, finite ? "" : "  NON-FINITE OUTPUT");
                }
            }
            cudaFree(bias);
            cudaFree(damped_array);
        }
    }

    FILE* f = std::fopen(out_path, "w");
    if (f == nullptr) {
        std::perror(out_path);
        return 1;
    }
    const char* command = std::getenv("VQ_BENCH_COMMAND");
    std::fprintf(f, "{\n  \"command\": \"%s\", \"binary\": \"bench_cuda_attention %s%s%s\",\n",
                 command != nullptr ? command : "", out_path, only.empty() ? "" : " ",
                 only.c_str());
    std::fprintf(f, "  \"device\": \"%s\", \"sms\": %d, \"l2_mb\": %d,\n", prop.name,
                 prop.multiProcessorCount, prop.l2CacheSize >> 20);
    std::fprintf(f,
                 "  \"copy_gbps_read_plus_write\": %.1f, \"copy_sm_mhz\": %.0f,\n"
                 "  \"max_rest_ms\": %d, \"decodes_per_graph\": %d, \"graphs\": %s,\n"
                 "  \"page_eviction\": %d, \"kv_heads\": %d, \"q_heads\": %d,\n"
                 "  \"center_keys\": %s,\n",
                 copy_gbps, copy_mhz, max_rest_ms, chain, use_graphs ? "true" : "false",
                 page_eviction, kKvHeads, q_heads, centred ? "true" : "false");
    std::fprintf(f, "  \"methods\": {");
    for (size_t i = 0; i < std::size(kMethods); ++i)
        std::fprintf(f, "%s\"%s\": {\"bits\": %d, \"stages\": %d, \"value_bits\": %d}",
                     i ? ", " : "", kMethods[i].name, kMethods[i].bits, kMethods[i].stages,
                     kMethods[i].value_bits);
    std::fprintf(f, "},\n  \"decode\": [\n");
    for (size_t i = 0; i < points.size(); ++i) {
        const Point& p = points[i];
        std::fprintf(f,
                     "    {\"method\": \"%s\", \"d\": %d, \"batch\": %d, \"tokens\": %d, \"ms\": "
                     "%.5f, \"ms_min\": %.5f, "
                     "\"compressed_bytes\": %.0f, \"gbps\": %.1f, \"ratio_to_copy\": %.3f, "
                     "\"finite\": %s, \"rest_ms\": %.0f, \"start_sm_mhz\": %.0f, "
                     "\"sm_mhz\": %.0f, \"splits\": %d}%s\n",
                     p.method.c_str(), p.d, p.batch, p.tokens, p.ms, p.ms_min, p.bytes, p.gbps,
                     p.gbps / copy_gbps, p.finite ? "true" : "false", p.rest_ms, p.start_mhz,
                     p.sm_mhz, p.splits, i + 1 < points.size() ? "," : "");
    }
    std::fprintf(f, "  ],\n  \"encode\": [\n");
    for (size_t i = 0; i < encodes.size(); ++i) {
        const Encode& e = encodes[i];
        std::fprintf(
            f,
            "    {\"method\": \"%s\", \"d\": %d, \"tokens\": %d, \"kv_heads\": %d, \"ms\": %.4f, "
            "\"bytes_in_plus_out\": %.0f, \"gbps\": %.1f, \"ratio_to_copy\": %.3f, "
            "\"tokens_per_s\": %.4g, \"rest_ms\": %.0f, \"start_sm_mhz\": %.0f, "
            "\"sm_mhz\": %.0f}%s\n",
            e.method.c_str(), e.d, e.tokens, kKvHeads, e.ms, e.bytes, e.gbps, e.gbps / copy_gbps,
            e.tokens_per_s, e.rest_ms, e.start_mhz, e.sm_mhz, i + 1 < encodes.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
    return 0;
}

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s OUT.json [METHOD:D:B:N]\n", argv[0]);
        return 2;
    }
    try {
        return run(argv[1], argc > 2 ? argv[2] : "");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_cuda_attention: %s\n", e.what());
        return 1;
    }
}
