// Times every method on the generic device path (CudaCodecCache): encode throughput of a
// prefill, decode attention (one query per head) and a causal prefill chunk's attention on the
// codes, at head dim 128, 8 KV heads, 32 query heads, one sequence of N in {8K, 32K} tokens (or
// the one N given);
// a decode step's append (one token per KV head, the input check's synchronization included)
// and a fresh cache's first append (rabitq's training included).
// The turboquant_rvq tensor-core decode (CudaTurboQuantCache) on the same config and a
// device-to-device copy are timed in the same process as references. Calibrated methods are
// calibrated on synthetic Gaussian activations (speed does not depend on the fit).
// With BATCH > 1, also BATCH sequences of N tokens attended by one CudaCodecBatch call (one
// launch of each kernel), the serving shape; every sequence's cache holds the same tokens; and a
// decode step's appends through the batch (one token a sequence), by CudaCodecBatch and, for
// turboquant_rvq, by the tuned CudaTurboQuantBatch; and BATCH fresh caches' first append through
// CudaCodecBatch (a model's first prefill of a layer: rabitq trains every sequence there).
// Decodes are timed cold, as a model's layers read them: consecutive calls rotate over sets of
// caches (same tokens) holding at least kRotateBytes of pages, far more than the 60 MB L2, as
// bench_cuda_attention and torch_sdpa.py do. decode_warm_ms repeats one cache, whose pages then
// come from the L2 when they fit (the only decode figure before session s). Every cache and batch
// attends once before its timing (a first attend allocates the workspace).
// Each cache's device memory beyond its nbytes(), from the free memory around the cold sets'
// extra caches (allocation granularity, or anything a cache holds without counting it).
// After each method, the device memory still held beyond what was free before the first one
// (every cache and workspace of it freed by then): what the driver keeps for the kernels' local
// memory (per-thread stacks, sized for every thread an SM can hold) and loaded code.
// Methods named *_centred take center_keys (the keys here have no mean to remove: they time the
// page bias alone).
// Usage: bench_codec_cache OUT.json [METHOD [TOKENS [BATCH]]]: only the methods whose name
// contains METHOD, only N = TOKENS (one point, up to kMaxTokens: 131072 times a 128K prefill's
// encode in one append; 0: 8K and 32K), BATCH sequences (1-512). VQ_PREFILL_CHUNK (1-512,
// default 512) sets the prefill chunk's queries a head.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bench_util.cuh"
#include "calibration/activations.h"
#include "calibration/calibrate.h"
#include "cuda/codec_batch.h"
#include "cuda/codec_cache.h"
#include "cuda/cuda_cache.h"
#include "cuda/turboquant_batch.h"
#include "veloxquant/calibration.h"
#include "veloxquant/config.h"

using namespace veloxquant;
using namespace veloxquant::cuda;
using namespace vqbench;

namespace {

constexpr int kKv = 8, kQ = 32, kD = 128, kChunk = 512, kMaxTokens = 131072;
constexpr double kRotateBytes = 512.0 * (1 << 20);
constexpr int kMaxSets = 64;

// How many sets of `set_bytes` keep kRotateBytes in rotation (1 to kMaxSets).
int rotation_sets(double set_bytes) {
    const int sets = static_cast<int>(std::ceil(kRotateBytes / set_bytes));
    return std::max(1, std::min(kMaxSets, sets));
}

struct Method {
    std::string name;
    KVCacheConfig config;
};

Activations synthetic_activations(int heads, int d, int rows) {
    Activations a;
    a.layers.resize(1);
    std::vector<float> host(static_cast<std::size_t>(rows) * d);
    uint64_t state = 12345;
    auto gauss = [&] {  // Box-Muller on a 64-bit LCG; the fit's quality does not matter here
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        const double u1 = ((state >> 11) + 1) * (1.0 / 9007199254740993.0);
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        const double u2 = (state >> 11) * (1.0 / 9007199254740992.0);
        return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) *
                                  std::cos(6.283185307179586 * u2));
    };
    for (int h = 0; h < heads; ++h) {
        HeadSamples k{d, {}, {}}, q{d, {}, {}};
        for (auto& x : host) x = gauss() * (1.0f + 0.1f * h);
        k.data = host;
        for (auto& x : host) x = gauss();
        q.data = host;
        a.layers[0].keys.push_back(k);
        a.layers[0].values.push_back(k);
        a.layers[0].queries.push_back(q);
    }
    return a;
}

KVCacheConfig make(const std::string& method, int bits, int value_bits) {
    KVCacheConfig c;
    c.method = method;
    c.bits = bits;
    c.value_bits = value_bits;
    if (needs_calibration(method) && method != "ratequant") {
        Calibration cal;
        calibrate_method(synthetic_activations(kKv, kD, 2048), c, cal);
        apply_calibration(cal, c);
    }
    return c;
}

// c with centred keys (center_keys) under a Llama RoPE of head_dim kD, transformers' pairing.
KVCacheConfig centred(KVCacheConfig c) {
    c.center_keys = true;
    c.rope_half_split = true;
    c.rope_inv_freq.clear();
    for (int i = 0; i < kD / 2; ++i) c.rope_inv_freq.push_back(std::pow(10000.0, -2.0 * i / kD));
    return c;
}

std::vector<Method> methods() {
    std::vector<Method> m;
    m.push_back({"fp16", make("fp16", 4, 16)});
    m.push_back({"turboquant_rvq_k4v4", make("turboquant_rvq", 4, 4)});
    m.push_back({"turboquant_rvq_k1v2", make("turboquant_rvq", 1, 2)});
    KVCacheConfig r = make("ratequant", 3, 4);
    for (int h = 0; h < kKv; ++h) r.bit_allocation["0." + std::to_string(h)] = h % 2 ? 2 : 4;
    m.push_back({"ratequant_2or4_v4", r});
    KVCacheConfig q = make("qjl", 1, 4);
    q.sketch_dim = 256;
    m.push_back({"qjl_m256_v4", q});
    m.push_back({"polarquant_b2_v4", make("polarquant", 2, 4)});
    KVCacheConfig rb = make("rabitq", 3, 4);
    rb.num_clusters = 64;
    m.push_back({"rabitq_b3_v4", rb});
    m.push_back({"vecinfer_b2_v4", make("vecinfer", 2, 4)});
    m.push_back({"spectral_b4_v4", make("spectral", 4, 4)});
    m.push_back({"commvq_b2_v4", make("commvq", 2, 4)});
    // Centred keys on the generic kernels (each chunk adds its page's <q, c_page>), beside the
    // same methods uncentred above.
    for (std::size_t i : {std::size_t{1}, std::size_t{4}, std::size_t{5}, std::size_t{6}})
        m.push_back({m[i].name + "_centred", centred(m[i].config)});
    return m;
}

struct Result {
    std::string method;
    int tokens;
    double first_append_ms, encode_ms, step_append_ms, decode_ms, decode_warm_ms, prefill_ms,
        tq_fast_decode_ms, page_mb, decode_gbps, batch_decode_ms, batch_decode_gbps,
        batch_step_append_ms, tq_fast_batch_step_append_ms, batch_first_append_ms;
    int decode_sets, batch_sets;
    /// Device memory a cache takes beyond its nbytes() (allocation granularity, anything it
    /// holds uncounted): over the cold sets' extra caches, each appended and attended once.
    double unreported_mib_per_cache;
};

double device_free_mib() {
    size_t free = 0, total = 0;
    check_cuda(cudaDeviceSynchronize(), "sync");
    check_cuda(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    return static_cast<double>(free) / (1 << 20);
}

constexpr int kSteps = 20;  // one-token appends timed after a prefill

/// The median time of a decode step's appends through a Batch (CudaCodecBatch or
/// CudaTurboQuantBatch): `batch` caches of n tokens each take one token a sequence, from `rows`
/// (any finite [batch][heads][1][d] floats).
template <class Cache, class Batch>
double batch_step_append_ms(const KVCacheConfig& config, int batch, int n, const float* keys,
                            const float* values, const float* rows) {
    std::vector<std::unique_ptr<Cache>> growing;
    std::vector<Cache*> grown;
    for (int b = 0; b < batch; ++b) {
        growing.push_back(std::make_unique<Cache>(config, kKv, kD, n + kSteps));
        growing.back()->append(keys, values, n, nullptr);
        grown.push_back(growing.back().get());
    }
    Batch step;
    return median(time_ms(kSteps, [&](int) { step.append(grown, rows, rows, 1, nullptr); }));
}

/// The median time of `batch` fresh caches' first append of n tokens each (the same tokens, the
/// first [heads][n][d] of keys and values) through one CudaCodecBatch call.
double batch_first_append_ms(const KVCacheConfig& config, int batch, int n, const float* keys,
                             const float* values) {
    const std::size_t per = static_cast<std::size_t>(kKv) * n * kD, bytes = per * sizeof(float);
    float *all_keys = nullptr, *all_values = nullptr;
    check_cuda(cudaMalloc(&all_keys, batch * bytes), "malloc");
    check_cuda(cudaMalloc(&all_values, batch * bytes), "malloc");
    for (int b = 0; b < batch; ++b) {
        check_cuda(cudaMemcpy(all_keys + b * per, keys, bytes, cudaMemcpyDeviceToDevice), "copy");
        check_cuda(cudaMemcpy(all_values + b * per, values, bytes, cudaMemcpyDeviceToDevice),
                   "copy");
    }
    const int repeats = 3;
    std::vector<std::unique_ptr<CudaCodecCache>> fresh;
    std::vector<std::vector<CudaCodecCache*>> sets(repeats);
    for (int i = 0; i < repeats; ++i)
        for (int b = 0; b < batch; ++b) {
            fresh.push_back(std::make_unique<CudaCodecCache>(config, kKv, kD, n));
            sets[i].push_back(fresh.back().get());
        }
    CudaCodecBatch appender;
    const double ms = median(time_ms(
        repeats, [&](int i) { appender.append(sets[i], all_keys, all_values, n, nullptr); }));
    fresh.clear();
    cudaFree(all_keys);
    cudaFree(all_values);
    return ms;
}

}  // namespace

int run(const char* out_path, const std::string& only_method, int only_tokens, int batch,
        int chunk) {
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, 0), "properties");
    const size_t copy_bytes = size_t(1) << 30;
    void *src = nullptr, *dst = nullptr;
    check_cuda(cudaMalloc(&src, copy_bytes), "malloc");
    check_cuda(cudaMalloc(&dst, copy_bytes), "malloc");
    const auto copy_ms =
        time_ms(10, [&](int) { cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice); });
    const double copy_gbps = 2.0 * copy_bytes / (median(copy_ms) * 1e-3) / 1e9;
    cudaFree(src);
    cudaFree(dst);
    std::printf("device %s, copy %.0f GB/s (read + write)\n", prop.name, copy_gbps);

    const int max_tokens = std::max(32768, only_tokens);
    const size_t kv = static_cast<size_t>(kKv) * max_tokens * kD;
    float *keys = nullptr, *values = nullptr, *queries = nullptr, *out = nullptr;
    check_cuda(cudaMalloc(&keys, kv * sizeof(float)), "malloc");
    check_cuda(cudaMalloc(&values, kv * sizeof(float)), "malloc");
    check_cuda(cudaMalloc(&queries, static_cast<size_t>(kQ) * kChunk * kD * sizeof(float)),
               "malloc");
    check_cuda(cudaMalloc(&out, static_cast<size_t>(kQ) * kChunk * kD * sizeof(float)), "malloc");
    fill(keys, kv, 1);
    fill(values, kv, 2);
    fill(queries, static_cast<size_t>(kQ) * kChunk * kD, 3);
    const float scale = 1.0f / std::sqrt(static_cast<float>(kD));

    std::vector<Result> results;
    std::vector<std::pair<std::string, double>> held;  // MiB beyond the start, after each method
    const double free_at_start = device_free_mib();
    for (const Method& m : methods()) {
        if (m.name.find(only_method) == std::string::npos) continue;
        const std::vector<int> token_counts =
            only_tokens > 0 ? std::vector<int>{only_tokens} : std::vector<int>{8192, 32768};
        for (const int n : token_counts) {
            Result r{};
            r.method = m.name;
            r.tokens = n;
            // A fresh cache's first append: rabitq's training (gather, copy, k-means, upload)
            // and the encode, as a model's first prefill of a layer pays them.
            std::vector<std::unique_ptr<CudaCodecCache>> fresh;
            for (int i = 0; i < 3; ++i)
                fresh.push_back(std::make_unique<CudaCodecCache>(m.config, kKv, kD, n));
            r.first_append_ms =
                median(time_ms(3, [&](int i) { fresh[i]->append(keys, values, n, nullptr); }));
            fresh.clear();
            CudaCodecCache cache(m.config, kKv, kD, n + kSteps);
            // Encode: n tokens in one append (keys laid out [heads][n][d]), into a reset cache.
            cache.append(keys, values, n, nullptr);  // trains rabitq, allocates every page
            r.encode_ms = median(time_ms(3, [&](int) {
                cache.reset();
                cache.append(keys, values, n, nullptr);
            }));
            r.page_mb = static_cast<double>(n) / 64 * cache.page_layout().page_bytes / 1e6;
            r.decode_warm_ms = median(
                time_ms(20, [&](int) { cache.attend(queries, kQ, 1, out, scale, true, nullptr); }));
            {  // cold: the first set is `cache`, the others hold the same tokens
                r.decode_sets = rotation_sets(r.page_mb * 1e6);
                const double free_before_others = device_free_mib();
                std::vector<std::unique_ptr<CudaCodecCache>> others;
                std::vector<CudaCodecCache*> sets{&cache};
                for (int s = 1; s < r.decode_sets; ++s) {
                    others.push_back(std::make_unique<CudaCodecCache>(m.config, kKv, kD, n));
                    others.back()->append(keys, values, n, nullptr);
                    sets.push_back(others.back().get());
                }
                // A cache's first attend allocates its workspace: once each before the timing.
                for (CudaCodecCache* c : sets) c->attend(queries, kQ, 1, out, scale, true, nullptr);
                if (!others.empty()) {
                    double reported = 0.0;
                    for (const auto& c : others) reported += c->nbytes() / double(1 << 20);
                    r.unreported_mib_per_cache =
                        (free_before_others - device_free_mib() - reported) / others.size();
                }
                const int reps = std::max(20, r.decode_sets);
                r.decode_ms = median(time_ms(reps, [&](int i) {
                    sets[i % sets.size()]->attend(queries, kQ, 1, out, scale, true, nullptr);
                }));
            }
            r.step_append_ms = median(time_ms(kSteps, [&](int) {
                cache.append(keys, values, 1, nullptr);  // [heads][1][d]: the first rows
            }));
            r.prefill_ms = median(time_ms(
                3, [&](int) { cache.attend(queries, kQ, chunk, out, scale, true, nullptr); }));
            r.decode_gbps = r.page_mb * 1e6 / (r.decode_ms * 1e-3) / 1e9;
            if (batch > 1) {  // queries and out hold kChunk >= batch rows of kQ heads
                r.batch_sets = rotation_sets(batch * r.page_mb * 1e6);
                std::vector<std::unique_ptr<CudaCodecCache>> seqs;
                std::vector<std::vector<CudaCodecCache*>> sets(r.batch_sets);
                for (auto& set : sets) {
                    for (int b = 0; b < batch; ++b) {
                        seqs.push_back(std::make_unique<CudaCodecCache>(m.config, kKv, kD, n));
                        seqs.back()->append(keys, values, n, nullptr);
                        set.push_back(seqs.back().get());
                    }
                }
                CudaCodecBatch step;
                for (const auto& set : sets) step.attend(set, queries, kQ, out, scale, nullptr);
                const int reps = std::max(20, r.batch_sets);
                r.batch_decode_ms = median(time_ms(reps, [&](int i) {
                    step.attend(sets[i % sets.size()], queries, kQ, out, scale, nullptr);
                }));
                r.batch_decode_gbps = batch * r.page_mb * 1e6 / (r.batch_decode_ms * 1e-3) / 1e9;
                r.batch_step_append_ms = batch_step_append_ms<CudaCodecCache, CudaCodecBatch>(
                    m.config, batch, n, keys, values, queries);
                r.batch_first_append_ms = batch_first_append_ms(m.config, batch, n, keys, values);
            }
            if (m.config.method == "turboquant_rvq") {
                std::vector<std::unique_ptr<CudaTurboQuantCache>> fast;
                for (int s = 0; s < r.decode_sets; ++s) {
                    fast.push_back(std::make_unique<CudaTurboQuantCache>(m.config, kKv, kD, n));
                    fast.back()->append(keys, values, n, nullptr);
                    fast.back()->attend(queries, kQ, out, scale, nullptr);
                }
                const int reps = std::max(20, r.decode_sets);
                r.tq_fast_decode_ms = median(time_ms(reps, [&](int i) {
                    fast[i % fast.size()]->attend(queries, kQ, out, scale, nullptr);
                }));
                if (batch > 1)
                    r.tq_fast_batch_step_append_ms =
                        batch_step_append_ms<CudaTurboQuantCache, CudaTurboQuantBatch>(
                            m.config, batch, n, keys, values, queries);
            }
            std::printf(
                "%-22s N=%5d first append %8.3f ms  encode %8.3f ms (%6.1f Mtok/s)  step append "
                "%7.3f ms  decode %7.3f ms (%5.0f GB/s, %.2f of copy; %d sets; one cache "
                "%.3f ms)  prefill %d: %8.2f ms  tq-fast decode %.3f ms\n",
                r.method.c_str(), n, r.first_append_ms, r.encode_ms, n / r.encode_ms / 1e3,
                r.step_append_ms, r.decode_ms, r.decode_gbps, r.decode_gbps / copy_gbps,
                r.decode_sets, r.decode_warm_ms, chunk, r.prefill_ms, r.tq_fast_decode_ms);
            std::printf("%-22s N=%5d device memory beyond nbytes: %.2f MiB a cache\n",
                        r.method.c_str(), n, r.unreported_mib_per_cache);
            if (batch > 1)
                std::printf(
                    "%-22s N=%5d batch %d decode %7.3f ms (%5.0f GB/s, %.2f of copy; %d sets)  "
                    "step append %7.3f ms  tq-fast step append %7.3f ms  batch first append "
                    "%8.3f ms\n",
                    r.method.c_str(), n, batch, r.batch_decode_ms, r.batch_decode_gbps,
                    r.batch_decode_gbps / copy_gbps, r.batch_sets, r.batch_step_append_ms,
                    r.tq_fast_batch_step_append_ms, r.batch_first_append_ms);
            std::fflush(stdout);
            results.push_back(r);
        }
        held.emplace_back(m.name, free_at_start - device_free_mib());
        std::printf("%-22s device memory held beyond the start: %.1f MiB\n", m.name.c_str(),
                    held.back().second);
    }
    cudaFree(keys);
    cudaFree(values);
    cudaFree(queries);
    cudaFree(out);

    FILE* f = std::fopen(out_path, "w");
    if (f == nullptr) throw std::runtime_error(std::string("cannot write ") + out_path);
    std::fprintf(
        f, "{\n  \"device\": \"%s\",\n  \"command\": \"bench_codec_cache %s \\\"%s\\\" %d %d\",\n",
        prop.name, out_path, only_method.c_str(), only_tokens, batch);
    std::fprintf(
        f,
        "  \"copy_gbps_read_plus_write\": %.1f,\n  \"kv_heads\": %d, \"q_heads\": %d, "
        "\"head_dim\": %d, \"prefill_chunk\": %d, \"batch\": %d,\n  \"note\": \"medians; decode "
        "and prefill attention on the codes (generic path); decode, batch_decode and tq_fast "
        "rotate over decode_sets / batch_sets sets of caches of the same tokens (at least %.0f "
        "MiB of pages, L2 cold), decode_warm repeats one cache; batch_decode = batch sequences "
        "in one CudaCodecBatch call (0: not measured; batch_first_append: batch fresh caches' "
        "first append in one call); tq_fast = the tensor-core turboquant_rvq decode\",\n  "
        "\"points\": [\n",
        copy_gbps, kKv, kQ, kD, chunk, batch, kRotateBytes / (1 << 20));
    for (std::size_t i = 0; i < results.size(); ++i) {
        const Result& r = results[i];
        std::fprintf(f,
                     "    {\"method\": \"%s\", \"tokens\": %d, \"first_append_ms\": %.4f, "
                     "\"encode_ms\": %.4f, "
                     "\"step_append_ms\": %.4f, \"decode_ms\": %.4f, \"decode_sets\": %d, "
                     "\"decode_warm_ms\": %.4f, \"prefill_chunk_ms\": %.3f, "
                     "\"tq_fast_decode_ms\": %.4f, \"page_mb\": %.2f, \"decode_gbps\": %.1f, "
                     "\"batch_decode_ms\": %.4f, \"batch_sets\": %d, "
                     "\"batch_decode_gbps\": %.1f, \"batch_step_append_ms\": %.4f, "
                     "\"tq_fast_batch_step_append_ms\": %.4f, \"batch_first_append_ms\": %.4f, "
                     "\"unreported_mib_per_cache\": %.2f}%s\n",
                     r.method.c_str(), r.tokens, r.first_append_ms, r.encode_ms, r.step_append_ms,
                     r.decode_ms, r.decode_sets, r.decode_warm_ms, r.prefill_ms,
                     r.tq_fast_decode_ms, r.page_mb, r.decode_gbps, r.batch_decode_ms, r.batch_sets,
                     r.batch_decode_gbps, r.batch_step_append_ms, r.tq_fast_batch_step_append_ms,
                     r.batch_first_append_ms, r.unreported_mib_per_cache,
                     i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "  ],\n  \"held_mib_after_method\": {");
    for (std::size_t i = 0; i < held.size(); ++i)
        std::fprintf(f, "%s\"%s\": %.1f", i ? ", " : "", held[i].first.c_str(), held[i].second);
    std::fprintf(f, "}\n}\n");
    std::fclose(f);
    return 0;
}

int main(int argc, char** argv) {
    const int batch = argc > 4 ? std::atoi(argv[4]) : 1;
    const int tokens = argc > 3 ? std::atoi(argv[3]) : 0;
    const char* chunk_env = std::getenv("VQ_PREFILL_CHUNK");
    const int chunk = chunk_env != nullptr ? std::atoi(chunk_env) : kChunk;
    if (argc < 2 || argc > 5 || batch < 1 || batch > kChunk || tokens < 0 || tokens > kMaxTokens ||
        (tokens > 0 && tokens < kChunk) || chunk < 1 || chunk > kChunk) {
        std::fprintf(stderr, "usage: %s OUT.json [METHOD [TOKENS (0, or %d-%d) [BATCH (1-%d)]]]\n",
                     argv[0], kChunk, kMaxTokens, kChunk);
        return 2;
    }
    try {
        return run(argv[1], argc > 2 ? argv[2] : "", tokens, batch, chunk);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
