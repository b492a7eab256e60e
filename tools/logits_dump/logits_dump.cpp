// logits_dump: runs a Llama GGUF model over a token list and writes or prints the logits; the
// pytest oracle (tests/python/test_forward_oracle.py) compares them with a numpy forward pass.
// With --bench it also measures prefill and decode speed.
//
//   logits_dump MODEL (--tokens IDS | --text TEXT | --bench N) [options]
//     --tokens IDS      token ids separated by commas or spaces
//     --text TEXT       tokenize TEXT with the model's tokenizer (special tokens parsed)
//     --bench N         N seeded random tokens; prints prefill and decode tokens/s
//     --out FILE        write the logits as little-endian float32 [rows][n_vocab]
//     --last            only the last token's logits (one row)
//     --chunk N         feed the tokens in forward() calls of N tokens (default: one call)
//     --decode N        then greedily decode N tokens one at a time (printed, and timed)
//     --method NAME     KV cache method (default fp16); --bits B, --value-bits V as KVCacheConfig
//     --top K           print the top K tokens of the last row (default 5)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "model/llama_model.h"
#include "model/matmul.h"
#include "model/tokenizer.h"

namespace {

using veloxquant::BPETokenizer;
using veloxquant::KVCacheConfig;
using veloxquant::LlamaModel;

struct Options {
    std::string model, tokens, text, out, method = "fp16";
    int bench = 0, chunk = 0, decode = 0, top = 5, bits = 1, value_bits = 2;
    bool last = false;
};

[[noreturn]] void usage(const std::string& msg) {
    std::cerr << "logits_dump: " << msg << "\n"
              << "usage: logits_dump MODEL (--tokens IDS | --text TEXT | --bench N) [--out FILE] "
                 "[--last] [--chunk N] [--decode N] [--method NAME] [--bits B] [--value-bits V] "
                 "[--top K]\n";
    std::exit(2);
}

int to_int(const std::string& s, const std::string& flag) {
    try {
        std::size_t used = 0;
        const int v = std::stoi(s, &used);
        if (used == s.size()) return v;
    } catch (const std::exception&) {
    }
    usage(flag + " needs an integer, got '" + s + "'");
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage(a + " needs a value");
            return argv[++i];
        };
        if (a == "--tokens")
            o.tokens = value();
        else if (a == "--text")
            o.text = value();
        else if (a == "--bench")
            o.bench = to_int(value(), a);
        else if (a == "--out")
            o.out = value();
        else if (a == "--last")
            o.last = true;
        else if (a == "--chunk")
            o.chunk = to_int(value(), a);
        else if (a == "--decode")
            o.decode = to_int(value(), a);
        else if (a == "--method")
            o.method = value();
        else if (a == "--bits")
            o.bits = to_int(value(), a);
        else if (a == "--value-bits")
            o.value_bits = to_int(value(), a);
        else if (a == "--top")
            o.top = to_int(value(), a);
        else if (!a.empty() && a[0] == '-')
            usage("unknown option " + a);
        else if (o.model.empty())
            o.model = a;
        else
            usage("unexpected argument " + a);
    }
    if (o.model.empty()) usage("no model given");
    if (o.tokens.empty() + o.text.empty() + (o.bench == 0) != 2)
        usage("give exactly one of --tokens, --text and --bench");
    return o;
}

std::vector<int32_t> parse_ids(std::string s) {
    for (char& c : s)
        if (c == ',') c = ' ';
    std::istringstream in(s);
    std::vector<int32_t> ids;
    for (std::string w; in >> w;) ids.push_back(to_int(w, "--tokens"));
    return ids;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int argmax(const float* v, int n) {
    int best = 0;
    for (int i = 1; i < n; ++i)
        if (v[i] > v[best]) best = i;
    return best;
}

int run(const Options& o) {
    const auto model = LlamaModel::load(o.model);
    const auto& hp = model->hparams();
    const int V = hp.n_vocab;
    std::unique_ptr<BPETokenizer> tok;
    if (!o.text.empty() || o.decode > 0)
        tok = std::make_unique<BPETokenizer>(veloxquant::vocab_from_gguf(model->gguf()));

    std::vector<int32_t> ids;
    if (!o.tokens.empty()) {
        ids = parse_ids(o.tokens);
    } else if (!o.text.empty()) {
        ids = tok->encode(o.text);
    } else {
        std::mt19937 gen(1234);
        for (int i = 0; i < o.bench; ++i) ids.push_back(static_cast<int32_t>(gen() % V));
    }
    if (ids.empty()) usage("no tokens");
    const int n = static_cast<int>(ids.size());
    const int chunk = o.chunk > 0 ? o.chunk : n;

    KVCacheConfig config;
    config.method = o.method;
    config.bits = o.bits;
    config.value_bits = o.value_bits;
    auto caches = model->make_caches(config, n + o.decode);
    const std::size_t rows = o.last ? 1 : static_cast<std::size_t>(n);
    std::vector<float> logits(rows * V);

    const auto t0 = std::chrono::steady_clock::now();
    for (int c0 = 0; c0 < n; c0 += chunk) {
        const int m = std::min(chunk, n - c0);
        // With --last every call writes its last row to the same place; the final call's stays.
        float* dst = o.last ? logits.data() : logits.data() + static_cast<std::size_t>(c0) * V;
        model->forward(ids.data() + c0, m, caches, dst, !o.last);
    }
    const double prefill_s = seconds_since(t0);
    std::fprintf(stderr, "model: %d layers, n_embd %d, vocab %d, weights %.1f MiB; CPU kernels %s\n",
                 hp.n_layer, hp.n_embd, V, model->weight_bytes() / 1048576.0,
                 veloxquant::cpu_isa_name());
    std::fprintf(stderr, "prefill: %d tokens in %.3f s = %.1f tokens/s (%s logits)\n", n, prefill_s,
                 n / prefill_s, o.last ? "last" : "all");

    const float* last = logits.data() + (rows - 1) * V;
    std::vector<std::pair<float, int>> order;
    for (int i = 0; i < V; ++i) order.emplace_back(last[i], i);
    const int k = std::min(o.top, V);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), std::greater<>());
    for (int i = 0; i < k; ++i)
        std::printf("top %d: id %d logit %.4f\n", i + 1, order[i].second, order[i].first);

    if (!o.out.empty()) {
        std::ofstream out(o.out, std::ios::binary);
        out.write(reinterpret_cast<const char*>(logits.data()),
                  static_cast<std::streamsize>(logits.size() * sizeof(float)));
        if (!out) throw std::runtime_error("cannot write " + o.out);
    }

    if (o.decode > 0) {
        std::vector<float> step(V);
        int32_t next = argmax(last, V);
        std::string text;
        const auto t1 = std::chrono::steady_clock::now();
        for (int i = 0; i < o.decode; ++i) {
            text += tok->token_to_piece(next);
            model->forward(&next, 1, caches, step.data(), false);
            next = argmax(step.data(), V);
        }
        const double decode_s = seconds_since(t1);
        std::fprintf(stderr, "decode: %d tokens in %.3f s = %.1f tokens/s (context %d -> %d)\n",
                     o.decode, decode_s, o.decode / decode_s, n, n + o.decode);
        std::printf("generated: %s\n", text.c_str());
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(parse(argc, argv));
    } catch (const std::exception& e) {
        std::cerr << "logits_dump: " << e.what() << "\n";
        return 1;
    }
}
