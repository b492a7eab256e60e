// `veloxquant synthetic`: runs every method on synthetic keys and values and prints bits per
// coordinate (every norm, scale and id counted), bytes per token, attention-output error
// against exact float attention, and append / decode-attend time against dense attention.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "attention/dense_attention.h"
#include "commands.h"
#include "veloxquant/veloxquant.h"

namespace veloxquant::cli {
namespace {

struct Options {
    int tokens = 4096;
    int kv_heads = 8;
    int group = 4;
    int head_dim = 128;
    int repeats = 5;
    uint64_t seed = 0;
    std::string json_path;
};

struct Variant {
    std::string label;
    KVCacheConfig config;
};

std::vector<Variant> variants() {
    std::vector<Variant> v;
    auto add = [&](const std::string& label, KVCacheConfig c) {
        v.push_back({label, std::move(c)});
    };
    KVCacheConfig c;
    c.method = "fp16";
    add("fp16 (baseline)", c);
    for (const std::string m : {"turboquant_rvq", "qjl", "polarquant", "rabitq", "ratequant"}) {
        c = KVCacheConfig{};
        c.method = m;
        add(m + " (defaults)", c);
    }
    for (int bits : {2, 3, 4}) {
        c = KVCacheConfig{};
        c.method = "turboquant_rvq";
        c.bits = bits;
        c.num_residuals = 1;
        c.value_bits = bits;
        add("turboquant_rvq b=" + std::to_string(bits) + " r=1 v=" + std::to_string(bits), c);
        c.method = "polarquant";
        add("polarquant b=" + std::to_string(bits) + " v=" + std::to_string(bits), c);
        c.method = "rabitq";
        add("rabitq b=" + std::to_string(bits) + " v=" + std::to_string(bits), c);
        c = KVCacheConfig{};
        c.method = "qjl";
        c.sketch_dim = 128 * bits;
        c.value_bits = bits;
        add("qjl m=" + std::to_string(c.sketch_dim) + " v=" + std::to_string(bits), c);
    }
    return v;
}

double median(std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x[x.size() / 2];
}

template <typename F>
double time_ms(F f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        num += (a[i] - b[i]) * static_cast<double>(a[i] - b[i]);
        den += b[i] * static_cast<double>(b[i]);
    }
    return std::sqrt(num / den);
}

void run(const Options& o) {
    const int n = o.tokens, h = o.kv_heads, d = o.head_dim, qh = h * o.group;
    std::mt19937_64 gen(o.seed);
    std::normal_distribution<float> normal;
    // Keys with a few strong channels (as RoPE'd LLM keys have), Gaussian values and queries.
    std::vector<float> k(static_cast<std::size_t>(h) * n * d), v(k.size()),
        q(static_cast<std::size_t>(qh) * d);
    for (std::size_t i = 0; i < k.size(); ++i) k[i] = normal(gen) * ((i % d) < 4 ? 4.0f : 1.0f);
    for (auto& x : v) x = normal(gen);
    for (auto& x : q) x = normal(gen);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));

    std::vector<float> exact(q.size());
    std::vector<double> dense_times;
    for (int r = 0; r < o.repeats; ++r)
        dense_times.push_back(time_ms([&] {
            dense_attention(q.data(), qh, 1, k.data(), v.data(), h, n, d, exact.data(), scale,
                            false);
        }));
    const double dense_ms = median(dense_times);
    const double dense_bytes_per_token = 2.0 * h * d * sizeof(float);

    std::cout << "VeloxQuant synthetic run: " << n << " tokens, " << h << " KV heads, " << qh
              << " query heads, head_dim " << d << ", seed " << o.seed << "\n"
              << "dense float32 decode attention: " << std::fixed << std::setprecision(3)
              << dense_ms << " ms (median of " << o.repeats << "), " << dense_bytes_per_token
              << " bytes/token\n\n";
    std::cout << std::left << std::setw(34) << "method" << std::right << std::setw(8) << "K bits"
              << std::setw(8) << "V bits" << std::setw(10) << "B/token" << std::setw(9) << "vs f32"
              << std::setw(11) << "attn err" << std::setw(12) << "append ms" << std::setw(12)
              << "attend ms" << std::setw(10) << "vs dense"
              << "\n";
    nlohmann::json rows = nlohmann::json::array();
    for (const Variant& var : variants()) {
        auto made = KVCacheFactory::create(var.config, h, d, n);
        auto& cache = static_cast<QuantizedKVCache&>(*made);
        const double append_ms = time_ms([&] { cache.append(k.data(), v.data(), n); });
        std::vector<float> out(q.size());
        std::vector<double> times;
        for (int r = 0; r < o.repeats; ++r)
            times.push_back(
                time_ms([&] { cache.attend(q.data(), qh, 1, out.data(), scale, false); }));
        const double attend_ms = median(times);
        const double bytes_per_token = static_cast<double>(cache.storage_bytes()) / n;
        const double err = rel_error(out, exact);
        std::cout << std::left << std::setw(34) << var.label << std::right << std::setprecision(3)
                  << std::setw(8) << cache.key_bits_per_coordinate() << std::setw(8)
                  << cache.value_bits_per_coordinate() << std::setprecision(1) << std::setw(10)
                  << bytes_per_token << std::setw(8) << dense_bytes_per_token / bytes_per_token
                  << "x" << std::setprecision(4) << std::setw(11) << err << std::setprecision(2)
                  << std::setw(12) << append_ms << std::setprecision(3) << std::setw(12)
                  << attend_ms << std::setprecision(2) << std::setw(9) << dense_ms / attend_ms
                  << "x\n";
        rows.push_back({{"method", var.config.method},
                        {"label", var.label},
                        {"key_bits_per_coordinate", cache.key_bits_per_coordinate()},
                        {"value_bits_per_coordinate", cache.value_bits_per_coordinate()},
                        {"bytes_per_token", bytes_per_token},
                        {"attention_rel_error", err},
                        {"append_ms", append_ms},
                        {"attend_ms_median", attend_ms},
                        {"speedup_vs_dense", dense_ms / attend_ms}});
    }
    std::cout << "\nK/V bits: per coordinate, codes plus every per-token norm, scale and id. "
                 "B/token: packed "
                 "storage held per token (all KV heads), page slack included.\n";
    if (!o.json_path.empty()) {
        nlohmann::json doc = {{"tokens", n},
                              {"kv_heads", h},
                              {"query_heads", qh},
                              {"head_dim", d},
                              {"seed", o.seed},
                              {"repeats", o.repeats},
                              {"dense_attend_ms_median", dense_ms},
                              {"rows", rows}};
        std::ofstream(o.json_path) << doc.dump(2) << "\n";
        std::cout << "wrote " << o.json_path << "\n";
    }
}

}  // namespace

void register_synthetic(CLI::App& app) {
    auto opts = std::make_shared<Options>();
    CLI::App* sub = app.add_subcommand(
        "synthetic", "Every method on synthetic keys/values: bits, bytes, error, speed");
    sub->add_option("--tokens", opts->tokens, "cached tokens")->check(CLI::Range(64, 1 << 20));
    sub->add_option("--kv-heads", opts->kv_heads, "KV heads")->check(CLI::Range(1, 128));
    sub->add_option("--group", opts->group, "query heads per KV head")->check(CLI::Range(1, 64));
    sub->add_option("--head-dim", opts->head_dim, "head dimension")->check(CLI::Range(16, 1024));
    sub->add_option("--repeats", opts->repeats, "timing repeats (median)")
        ->check(CLI::Range(1, 1000));
    sub->add_option("--seed", opts->seed, "data seed");
    sub->add_option("--json", opts->json_path, "also write the table as JSON to this file");
    sub->callback([opts] { run(*opts); });
}

}  // namespace veloxquant::cli
