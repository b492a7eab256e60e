// Times a causal prefill on the codes where the chunk does not see every stored token: a sliding
// window's prompt and a chunk over an outlier side store (CudaCodecCache), at head dim 128, 8 KV
// heads, 32 query heads, one sequence.
//   window: a prompt of PROMPT tokens appended as one chunk to a cache with a sliding window
//           of WINDOW tokens (sinks 0, as transformers' sliding layers get; and 4), then the
//           prompt's queries attend causally on the codes, as VeloxQuantCudaKVLayer's prefill
//           of a sliding layer does; beside it the same prompt over a cache without window
//           (every query sees all its earlier tokens).
//   outliers: a cache with a KeyNormObserver (z 3) filled to N tokens in 4096-token chunks whose
//           keys' norms are log-normal (sigma 0.5: the observer flags their tails), then a
//           512-token chunk appended and attended causally; beside it the same cache without
//           observer.
// Every attend time is the median of --repeats calls after one untimed call (CUDA events around
// the call, the legacy default stream); append_ms is one call: the prompt's append (the process's
// first also pays its first launches) or the 512-token chunk's (norms, observer and records
// included). The dense baseline (torch SDPA of the same shapes) is
// bench/cuda/sdpa_prefill_chunk.py --window, run in the same device call.
// Usage: bench_window_prefill OUT.json [PROMPT [WINDOW [N [REPEATS]]]] (defaults 32768 4096
// 32768 5).
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
#include "cuda/codec_cache.h"
#include "veloxquant/config.h"
#include "veloxquant/observer.h"

using namespace veloxquant;
using namespace veloxquant::cuda;
using namespace vqbench;

namespace {

constexpr int kKv = 8, kQ = 32, kD = 128, kChunk = 512, kFillChunk = 4096;

/// keys[row] *= exp(sigma z[row]): log-normal norms over Gaussian directions.
__global__ void scale_rows(float* keys, const float* z, long long rows, int d, float sigma) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= rows * d) return;
    keys[i] *= expf(sigma * z[i / d]);
}

struct DeviceFloats {
    float* p = nullptr;
    explicit DeviceFloats(std::size_t n) {
        check_cuda(cudaMalloc(reinterpret_cast<void**>(&p), n * sizeof(float)), "cudaMalloc");
    }
    ~DeviceFloats() { cudaFree(p); }
    DeviceFloats(const DeviceFloats&) = delete;
    DeviceFloats& operator=(const DeviceFloats&) = delete;
};

KVCacheConfig make(int bits, int value_bits, const std::string& method = "turboquant_rvq") {
    KVCacheConfig c;
    c.method = method;
    c.bits = bits;
    c.value_bits = value_bits;
    return c;
}

struct Point {
    std::string kind, method;
    int tokens = 0, queries = 0, window = 0, sinks = 0, outlier_tokens = 0;
    float append_ms = 0.0f, attend_ms = 0.0f;
};

// The prompt appended as one chunk, then its queries attending causally (median of repeats).
Point window_point(const std::string& name, const KVCacheConfig& config, int prompt, int window,
                   int sinks, int repeats) {
    const std::size_t kv = static_cast<std::size_t>(kKv) * prompt * kD;
    DeviceFloats keys(kv), values(kv), queries(kv * (kQ / kKv)), out(kv * (kQ / kKv));
    fill(keys.p, kv, 11);
    fill(values.p, kv, 12);
    fill(queries.p, kv * (kQ / kKv), 13);
    CudaCodecCache cache(config, kKv, kD, prompt, 0, window, sinks);
    const float scale = 1.0f / std::sqrt(static_cast<float>(kD));
    Point p{"window", name, prompt, prompt, window, sinks};
    p.append_ms = time_ms(1, [&](int) { cache.append(keys.p, values.p, prompt, nullptr); })[0];
    cache.attend(queries.p, kQ, prompt, out.p, scale, true, nullptr);
    p.attend_ms = median(time_ms(
        repeats, [&](int) { cache.attend(queries.p, kQ, prompt, out.p, scale, true, nullptr); }));
    return p;
}

// N tokens in fill chunks, then a kChunk chunk appended and attended causally.
Point outlier_point(const std::string& name, KVCacheConfig config, bool observed, int n,
                    int repeats) {
    if (observed) config.outlier_observer = std::make_shared<KeyNormObserver>(3.0);
    const std::size_t kv = static_cast<std::size_t>(kKv) * kFillChunk * kD;
    DeviceFloats keys(kv), values(kv), z(static_cast<std::size_t>(kKv) * kFillChunk);
    const std::size_t qn = static_cast<std::size_t>(kQ) * kChunk * kD;
    DeviceFloats queries(qn), out(qn);
    fill(queries.p, qn, 21);
    CudaCodecCache cache(config, kKv, kD, n + kChunk, 0, 0, 0);
    float append_ms = 0.0f;
    for (int start = 0, c = 0; start < n + kChunk; ++c) {
        const int m = start < n ? std::min(kFillChunk, n - start) : kChunk;
        const long long rows = static_cast<long long>(kKv) * m;  // [heads][m][d]
        fill(keys.p, rows * kD, 100 + 3 * c);
        fill(values.p, rows * kD, 101 + 3 * c);
        fill(z.p, rows, 102 + 3 * c);
        scale_rows<<<static_cast<unsigned>((rows * kD + 255) / 256), 256>>>(keys.p, z.p, rows, kD,
                                                                            0.5f);
        check_cuda(cudaGetLastError(), "scale_rows");
        if (start < n)
            cache.append(keys.p, values.p, m, nullptr);
        else  // the chunk: its append timed
            append_ms = time_ms(1, [&](int) { cache.append(keys.p, values.p, m, nullptr); })[0];
        start += m;
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(kD));
    Point p{observed ? "outliers" : "no_observer", name, n + kChunk, kChunk};
    p.append_ms = append_ms;
    p.outlier_tokens = cache.outlier_tokens();
    cache.attend(queries.p, kQ, kChunk, out.p, scale, true, nullptr);
    p.attend_ms = median(time_ms(
        repeats, [&](int) { cache.attend(queries.p, kQ, kChunk, out.p, scale, true, nullptr); }));
    return p;
}

int run(const char* out_path, int prompt, int window, int n, int repeats) {
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, 0), "device properties");
    std::vector<Point> points;
    const std::vector<std::pair<std::string, KVCacheConfig>> methods = {
        {"turboquant_rvq_k2v4", make(2, 4)},
        {"turboquant_rvq_k1v2", make(1, 2)},
        {"fp16", make(4, 16, "fp16")},
    };
    const auto report = [&](const Point& p) {
        std::printf(
            "%-12s %-22s tokens %6d queries %6d window %5d sinks %d outliers %5d  "
            "append %9.3f ms  attend %9.3f ms\n",
            p.kind.c_str(), p.method.c_str(), p.tokens, p.queries, p.window, p.sinks,
            p.outlier_tokens, p.append_ms, p.attend_ms);
        std::fflush(stdout);
        points.push_back(p);
    };
    for (const auto& [name, config] : methods) {
        report(window_point(name, config, prompt, window, 0, repeats));
        report(window_point(name, config, prompt, window, 4, repeats));
        report(window_point(name, config, prompt, 0, 0, repeats));
    }
    for (const auto& [name, config] : methods) {
        if (config.method == "fp16") continue;
        report(outlier_point(name, config, true, n, repeats));
        report(outlier_point(name, config, false, n, repeats));
    }
    FILE* f = std::fopen(out_path, "w");
    if (f == nullptr) throw std::runtime_error(std::string("cannot write ") + out_path);
    std::fprintf(f,
                 "{\n  \"device\": \"%s\",\n  \"command\": \"bench_window_prefill %s %d %d %d "
                 "%d\",\n  \"kv_heads\": %d, \"q_heads\": %d, \"head_dim\": %d,\n  \"note\": "
                 "\"attend_ms: medians of CUDA-event times; append_ms: one call; window: a prompt "
                 "appended as one chunk, then its queries attend causally on the codes (window 0: "
                 "no window); outliers / no_observer: a %d-token chunk appended at the end of the "
                 "tokens, then attended causally\",\n  \"points\": [\n",
                 prop.name, out_path, prompt, window, n, repeats, kKv, kQ, kD, kChunk);
    for (std::size_t i = 0; i < points.size(); ++i) {
        const Point& p = points[i];
        std::fprintf(f,
                     "    {\"kind\": \"%s\", \"method\": \"%s\", \"tokens\": %d, \"queries\": %d, "
                     "\"window\": %d, \"sinks\": %d, \"outlier_tokens\": %d, \"append_ms\": %.4f, "
                     "\"attend_ms\": %.4f}%s\n",
                     p.kind.c_str(), p.method.c_str(), p.tokens, p.queries, p.window, p.sinks,
                     p.outlier_tokens, p.append_ms, p.attend_ms, i + 1 < points.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const int prompt = argc > 2 ? std::atoi(argv[2]) : 32768;
    const int window = argc > 3 ? std::atoi(argv[3]) : 4096;
    const int n = argc > 4 ? std::atoi(argv[4]) : 32768;
    const int repeats = argc > 5 ? std::atoi(argv[5]) : 5;
    if (argc < 2 || argc > 6 || prompt < 1 || prompt > 131072 || window < 1 || n < 0 ||
        n > 131072 || repeats < 1) {
        std::fprintf(stderr,
                     "usage: %s OUT.json [PROMPT (1-131072) [WINDOW (>= 1) [N (0-131072) "
                     "[REPEATS]]]]\n",
                     argv[0]);
        return 2;
    }
    try {
        return run(argv[1], prompt, window, n, repeats);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
