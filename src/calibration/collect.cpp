#include "calibration/collect.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "attention/dense_attention.h"
#include "core/half.h"
#include "core/rng.h"
#include "model/llama_model.h"
#include "veloxquant/factory.h"

namespace veloxquant {
namespace {

// A bounded uniform sample of a stream of rows (Vitter's algorithm R): the first `cap` rows are
// kept; row i >= cap replaces a uniformly chosen kept row with probability cap / (i + 1), which
// leaves every row seen so far in the sample with the same probability.
class Reservoir {
public:
    Reservoir(int cap, uint64_t seed) : cap_(cap), rng_(seed) {}

    // Slot for the next row of the stream, or -1 when the row is not kept.
    int64_t admit() {
        const int64_t i = seen_++;
        if (i < cap_) return i;
        const auto j = static_cast<int64_t>(rng_.below(static_cast<uint64_t>(i) + 1));
        return j < cap_ ? j : -1;
    }

private:
    int64_t cap_;
    int64_t seen_ = 0;
    Rng rng_;
};

// Stores row `src` at `slot` of samples (appending when slot is the next row).
void put_row(HeadSamples& s, int64_t slot, const float* src, int32_t pos) {
    const std::size_t d = static_cast<std::size_t>(s.dim);
    if (slot == s.count()) {
        s.data.insert(s.data.end(), src, src + d);
        s.positions.push_back(pos);
    } else {
        std::memcpy(&s.data[static_cast<std::size_t>(slot) * d], src, d * sizeof(float));
        s.positions[static_cast<std::size_t>(slot)] = pos;
    }
}

// What one layer's recording caches feed: the samples and their reservoirs, kept across the
// sequences (each sequence gets fresh caches).
struct LayerSink {
    LayerActivations* out = nullptr;
    std::vector<Reservoir> kv, queries;
};

// A cache that records the keys and values appended and the queries attended with. Storage is
// an fp16 cache (what the rest of the cache API sees: size, dequantize, trim); attention runs as
// dense float attention over the same fp16-rounded keys and values, which is the fp16 cache's
// attention up to the order of float sums but several times faster than its table-gather scorer
// (collection is dominated by attention at ctx 512 otherwise).
class RecordingCache : public KVCache {
public:
    RecordingCache(std::unique_ptr<KVCache> inner, LayerSink* sink)
        : inner_(std::move(inner)),
          sink_(sink),
          keys_(inner_->num_heads()),
          values_(inner_->num_heads()) {}

    void append(const float* keys, const float* values, int n_tokens) override {
        const int pos0 = inner_->size();
        inner_->append(keys, values, n_tokens);  // checks the arguments first
        const int H = num_heads(), d = head_dim();
        for (int h = 0; h < H; ++h) {
            const std::size_t first = static_cast<std::size_t>(h) * n_tokens * d;
            for (std::size_t i = first; i < first + static_cast<std::size_t>(n_tokens) * d; ++i) {
                keys_[h].push_back(half_to_float(float_to_half(keys[i])));
                values_[h].push_back(half_to_float(float_to_half(values[i])));
            }
            for (int t = 0; t < n_tokens; ++t) {
                const int64_t slot = sink_->kv[h].admit();
                if (slot < 0) continue;
                const std::size_t off = first + static_cast<std::size_t>(t) * d;
                put_row(sink_->out->keys[h], slot, keys + off, pos0 + t);
                put_row(sink_->out->values[h], slot, values + off, pos0 + t);
            }
        }
    }

    void attend(const float* queries, int num_q_heads, int n_queries, float* out, float scale,
                bool causal) const override {
        const int H = num_heads(), d = head_dim(), n = size();
        if (queries == nullptr || out == nullptr || num_q_heads < H || num_q_heads % H != 0 ||
            n_queries < 1 || (causal && n_queries > n))
            return inner_->attend(queries, num_q_heads, n_queries, out, scale,
                                  causal);  // its errors
        std::vector<float> k, v;
        k.reserve(static_cast<std::size_t>(H) * n * d), v.reserve(k.capacity());
        for (int h = 0; h < H; ++h) {
            k.insert(k.end(), keys_[h].begin(), keys_[h].end());
            v.insert(v.end(), values_[h].begin(), values_[h].end());
        }
        dense_attention(queries, num_q_heads, n_queries, k.data(), v.data(), H, n, d, out, scale,
                        causal);
        const int group = num_q_heads / H;
        const int pos0 = n - n_queries;  // the queries are the last tokens appended
        for (int qh = 0; qh < num_q_heads; ++qh)
            for (int i = 0; i < n_queries; ++i) {
                const int64_t slot = sink_->queries[qh / group].admit();
                if (slot < 0) continue;
                put_row(sink_->out->queries[qh / group], slot,
                        queries + (static_cast<std::size_t>(qh) * n_queries + i) * d, pos0 + i);
            }
    }

    void dequantize(int start, int n_tokens, float* keys_out, float* values_out) const override {
        inner_->dequantize(start, n_tokens, keys_out, values_out);
    }
    int size() const override { return inner_->size(); }
    int max_seq_len() const override { return inner_->max_seq_len(); }
    std::size_t nbytes() const override { return inner_->nbytes(); }
    void trim(int n_tokens) override {
        inner_->trim(n_tokens);
        for (int h = 0; h < num_heads(); ++h) {
            keys_[h].resize(static_cast<std::size_t>(size()) * head_dim());
            values_[h].resize(keys_[h].size());
        }
    }
    void reset() override {
        inner_->reset();
        for (auto& k : keys_) k.clear();
        for (auto& v : values_) v.clear();
    }
    void save(const std::string& path) const override { inner_->save(path); }
    int num_heads() const override { return inner_->num_heads(); }
    int head_dim() const override { return inner_->head_dim(); }
    const KVCacheConfig& config() const override { return inner_->config(); }
    std::string class_name() const override { return "RecordingCache"; }

private:
    std::unique_ptr<KVCache> inner_;
    LayerSink* sink_;
    std::vector<std::vector<float>> keys_, values_;  // [head][token][d], fp16-rounded
};

// Keeps the streams of collection apart from the codecs' (which use the same derive_seed).
constexpr uint64_t kCollectSalt = 0x636f6c6c65637421ULL;  // "collect!"

}  // namespace

void CollectOptions::validate() const {
    if (ctx < 2)
        throw std::invalid_argument("CollectOptions.ctx must be >= 2, got " + std::to_string(ctx));
    if (max_kv_rows < 1)
        throw std::invalid_argument("CollectOptions.max_kv_rows must be >= 1, got " +
                                    std::to_string(max_kv_rows));
    if (max_query_rows < 1)
        throw std::invalid_argument("CollectOptions.max_query_rows must be >= 1, got " +
                                    std::to_string(max_query_rows));
}

std::vector<double> model_rope_inv_freq(const LlamaModel& model) {
    const LlamaHParams& hp = model.hparams();
    std::vector<double> f(static_cast<std::size_t>(hp.rope_dim / 2));
    for (int i = 0; i < hp.rope_dim / 2; ++i)
        f[i] = hp.rope_freq_scale *
               std::pow(static_cast<double>(hp.rope_freq_base), -2.0 * i / hp.rope_dim);
    return f;
}

Activations collect_activations(const LlamaModel& model, const std::vector<int32_t>& tokens,
                                const CollectOptions& opts) {
    opts.validate();
    if (tokens.size() < 2)
        throw std::invalid_argument("collect_activations: needs at least 2 tokens, got " +
                                    std::to_string(tokens.size()));
    const LlamaHParams& hp = model.hparams();
    const int L = hp.n_layer, H = hp.n_head_kv, d = hp.head_dim;
    Activations acts;
    acts.rope.inv_freq = model_rope_inv_freq(model);
    acts.layers.resize(L);
    std::vector<LayerSink> sinks(L);
    for (int l = 0; l < L; ++l) {
        LayerActivations& la = acts.layers[l];
        for (auto* v : {&la.keys, &la.values, &la.queries}) v->assign(H, HeadSamples{d, {}, {}});
        sinks[l].out = &la;
        for (int h = 0; h < H; ++h) {
            sinks[l].kv.emplace_back(
                opts.max_kv_rows,
                derive_seed(opts.seed, l, h, 1, RandomPurpose::kSketch) ^ kCollectSalt);
            sinks[l].queries.emplace_back(
                opts.max_query_rows,
                derive_seed(opts.seed, l, h, 2, RandomPurpose::kSketch) ^ kCollectSalt);
        }
    }
    KVCacheConfig fp16;
    fp16.method = "fp16";
    std::vector<float> logits(static_cast<std::size_t>(hp.n_vocab));
    const int64_t n_total = static_cast<int64_t>(tokens.size());
    for (int64_t start = 0; start + 2 <= n_total; start += opts.ctx) {
        const int n = static_cast<int>(std::min<int64_t>(opts.ctx, n_total - start));
        std::vector<std::unique_ptr<KVCache>> caches;
        for (int l = 0; l < L; ++l)
            caches.push_back(std::make_unique<RecordingCache>(
                KVCacheFactory::create(fp16, H, d, n, l), &sinks[l]));
        model.forward(tokens.data() + start, n, caches, logits.data(), /*all_logits=*/false);
        if (opts.progress) opts.progress(n);
    }
    return acts;
}

ModelFingerprint model_fingerprint(const LlamaModel& model) {
    const GGUFFile& f = model.gguf();
    ModelFingerprint fp;
    fp.architecture = f.get_string("general.architecture");
    if (f.has("general.name") && f.value_type("general.name") == GGUFValueType::STRING)
        fp.name = f.get_string("general.name");
    fp.shape = model.cache_shape();
    // FNV-1a, 64 bits.
    uint64_t h = 0xcbf29ce484222325ULL;
    auto mix = [&h](const void* p, std::size_t n) {
        const auto* b = static_cast<const uint8_t*>(p);
        for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ULL;
    };
    for (const GGUFTensor& t : f.tensors()) {
        mix(t.name.data(), t.name.size());
        const auto type = static_cast<uint32_t>(t.type);
        mix(&type, sizeof type);
        for (int64_t dim : t.dims) mix(&dim, sizeof dim);
        mix(t.data, std::min<std::size_t>(t.nbytes, 64));
    }
    fp.tensor_hash = h;
    return fp;
}

}  // namespace veloxquant
