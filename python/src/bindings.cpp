// nanobind bindings of the VeloxQuant C++ API: the extension module veloxquant._core.
//
// Thin by design: arrays cross as C-contiguous float32 CPU ndarrays (numpy, or torch through
// DLPack, zero-copy), shapes are checked only as far as memory safety needs, and the
// pure-Python package (python/veloxquant) adds the seed's names, dtype conversion, batch
// dimensions and friendly messages. C++ exceptions become Python exceptions carrying the C++
// message: std::invalid_argument -> ValueError, std::length_error -> CapacityError (a
// ValueError), std::out_of_range -> IndexError, std::runtime_error -> RuntimeError.
// append, attend and dequantize run without the GIL.
//
// The CUDA backend's device-resident caches are bound in bind_cuda.cpp (with the build's
// VQ_CUDA=ON; HAS_CUDA says whether this build has them), calibration in bind_calibration.cpp.
//
// The submodule _debug exposes internals for the test suite's independent numpy references:
// the raw bytes of one page of packed storage, the scalar codebooks, and a pure C++ run of a
// cache on copied inputs.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bind_arrays.h"
#include "cache/paged_store.h"
#include "core/binary_io.h"
#include "core/lloyd_max.h"
#include "methods/centered_key_codec.h"
#include "methods/key_codec.h"
#include "methods/value_codec.h"
#include "model/llama_model.h"
#include "veloxquant/veloxquant.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace veloxquant;

namespace {

using InArray = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using OutArray = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
using bind::copy_array;
using bind::new_array;
using bind::Numpy;

FloatArray to_float_array(const InArray& a) {
    FloatArray f;
    f.data.assign(a.data(), a.data() + a.size());
    for (size_t i = 0; i < a.ndim(); ++i) f.shape.push_back(static_cast<int64_t>(a.shape(i)));
    return f;
}

std::vector<size_t> shape_of(const FloatArray& f) {
    std::vector<size_t> shape(f.shape.begin(), f.shape.end());
    if (shape.empty() && !f.data.empty()) shape.push_back(f.data.size());
    return shape;
}

nb::object from_float_array(const FloatArray& f) {
    if (f.empty()) return nb::none();
    return nb::cast(copy_array<float>(f.data.data(), shape_of(f)));
}

/// Checks that a token array is [num_heads][n][head_dim] and returns n.
int token_count(const KVCache& c, const InArray& a, const char* name) {
    if (a.ndim() != 3 || a.shape(0) != static_cast<size_t>(c.num_heads()) ||
        a.shape(2) != static_cast<size_t>(c.head_dim()))
        throw std::invalid_argument(std::string(name) +
                                    " must be float32 [num_heads=" + std::to_string(c.num_heads()) +
                                    ", n_tokens, head_dim=" + std::to_string(c.head_dim()) + "]");
    return static_cast<int>(a.shape(1));
}

void append(KVCache& c, const InArray& keys, const InArray& values) {
    const int n = token_count(c, keys, "keys");
    if (token_count(c, values, "values") != n)
        throw std::invalid_argument("keys and values must hold the same number of tokens");
    c.append(keys.data(), values.data(), n);
}

void attend(const KVCache& c, const InArray& queries, OutArray out, float scale, bool causal) {
    if (queries.ndim() != 3 || queries.shape(2) != static_cast<size_t>(c.head_dim()))
        throw std::invalid_argument("queries must be float32 [num_q_heads, n_queries, head_dim=" +
                                    std::to_string(c.head_dim()) + "]");
    if (out.ndim() != 3 || out.shape(0) != queries.shape(0) || out.shape(1) != queries.shape(1) ||
        out.shape(2) != queries.shape(2))
        throw std::invalid_argument(
            "out must be a C-contiguous float32 array shaped like the queries");
    c.attend(queries.data(), static_cast<int>(queries.shape(0)), static_cast<int>(queries.shape(1)),
             out.data(), scale, causal);
}

std::pair<Numpy<float>, Numpy<float>> dequantize(const KVCache& c, int start, int n_tokens) {
    if (n_tokens < 0 || start < 0 || static_cast<long long>(start) + n_tokens > c.size())
        throw std::out_of_range("dequantize: range [" + std::to_string(start) + ", " +
                                std::to_string(static_cast<long long>(start) + n_tokens) +
                                ") is outside [0, " + std::to_string(c.size()) + ")");
    const std::vector<size_t> shape = {static_cast<size_t>(c.num_heads()),
                                       static_cast<size_t>(n_tokens),
                                       static_cast<size_t>(c.head_dim())};
    Numpy<float> keys = new_array<float>(shape), values = new_array<float>(shape);
    {
        nb::gil_scoped_release release;
        c.dequantize(start, n_tokens, keys.data(), values.data());
    }
    return {keys, values};
}

// ---- _debug: raw storage access for the independent numpy references ----------------------

/// The page layout of a cache, rebuilt from its codecs' sizes (paged_store.h documents it).
PageLayout layout_of(const QuantizedKVCache& c) {
    const KVCacheConfig& cfg = c.config();
    const int value_bits = cfg.method == "fp16" ? 16 : cfg.value_bits;
    PageLayout layout;
    layout.tokens_per_page = kTokensPerPage;
    for (int h = 0; h < c.num_heads(); ++h) {
        const auto kc = make_key_codec(cfg, c.head_dim(), c.layer(), h);
        const ValueCodec vc(c.head_dim(), value_bits, cfg.use_hadamard, 0);
        HeadLayout hl;
        hl.key_code_bytes = kc->code_bytes();
        hl.key_scalars = kc->num_scalars();
        hl.value_code_bytes = vc.code_bytes();
        hl.value_scalars = vc.num_scalars();
        layout.heads.push_back(hl);
    }
    layout.finalize();
    return layout;
}

/// One head's regions of one page, read from the cache's serialized body, whose tail is
/// page_bytes (u64), page slots (i32), then per slot a held flag (u8) and the page's bytes.
nb::dict page_regions(const QuantizedKVCache& c, int page, int head) {
    const PageLayout layout = layout_of(c);
    const int P = layout.tokens_per_page;
    const int slots = (c.size() + P - 1) / P;
    if (page < 0 || page >= slots || head < 0 || head >= c.num_heads())
        throw std::out_of_range("page_regions: page " + std::to_string(page) + " / head " +
                                std::to_string(head) + " out of range");
    BinaryWriter body;
    c.write_body(body);
    const std::string& buf = body.buffer();
    const std::size_t pb = layout.page_bytes;
    const std::size_t tail = 8 + 4 + static_cast<std::size_t>(slots) * (1 + pb);
    if (buf.size() < tail) throw std::runtime_error("page_regions: serialized body too short");
    const char* at = buf.data() + buf.size() - tail;
    uint64_t stored_pb;
    int32_t stored_slots;
    std::memcpy(&stored_pb, at, 8);
    std::memcpy(&stored_slots, at + 8, 4);
    if (stored_pb != pb || stored_slots != slots)
        throw std::runtime_error("page_regions: serialized layout (" + std::to_string(stored_pb) +
                                 " bytes x " + std::to_string(stored_slots) +
                                 " pages) differs from the codecs' (" + std::to_string(pb) + " x " +
                                 std::to_string(slots) + ")");
    const char* slot = at + 12 + static_cast<std::size_t>(page) * (1 + pb);
    for (int p = 0; p < slots; ++p)
        if (at[12 + static_cast<std::size_t>(p) * (1 + pb)] != 1)
            throw std::runtime_error("page_regions: needs every page held (no eviction)");
    const auto* data = reinterpret_cast<const uint8_t*>(slot + 1);
    const HeadLayout& h = layout.heads[head];
    const auto floats = [&](std::size_t offset) {
        return reinterpret_cast<const float*>(data + offset);
    };
    nb::dict d;
    d["key_codes"] = copy_array<uint8_t>(data + h.key_codes_offset, {size_t(P), h.key_code_bytes});
    d["key_scalars"] =
        copy_array<float>(floats(h.key_scalars_offset), {size_t(h.key_scalars), size_t(P)});
    d["value_codes"] =
        copy_array<uint8_t>(data + h.value_codes_offset, {size_t(P), h.value_code_bytes});
    d["value_scalars"] =
        copy_array<float>(floats(h.value_scalars_offset), {size_t(h.value_scalars), size_t(P)});
    d["page_bytes"] = pb;
    return d;
}

nb::tuple scalar_codebook(const std::string& law, int d, int bits, int index) {
    const ScalarCodebook* cb = nullptr;
    if (law == "rotated")
        cb = &rotated_coordinate_codebook(d, bits);
    else if (law == "residual")
        cb = &residual_codebook(d, bits, index);
    else if (law == "polar")
        cb = &polar_angle_codebook(index, bits);
    else
        throw std::invalid_argument("scalar_codebook: law must be rotated, residual or polar");
    return nb::make_tuple(copy_array<float>(cb->centroids.data(), {cb->centroids.size()}),
                          copy_array<float>(cb->boundaries.data(), {cb->boundaries.size()}));
}

/// The whole life of a cache in C++ on copies of the inputs: appends in the given chunk sizes,
/// then attend and dequantize of every token.
std::tuple<Numpy<float>, Numpy<float>, Numpy<float>> reference_run(
    const KVCacheConfig& config, int num_heads, int head_dim, int max_seq_len, int layer,
    const InArray& keys, const InArray& values, const std::vector<int>& chunks,
    const InArray& queries, float scale, bool causal) {
    const std::vector<float> k(keys.data(), keys.data() + keys.size());
    const std::vector<float> v(values.data(), values.data() + values.size());
    const std::vector<float> q(queries.data(), queries.data() + queries.size());
    const size_t total = keys.ndim() == 3 ? keys.shape(1) : 0;
    const size_t d = static_cast<size_t>(head_dim);
    auto cache = KVCacheFactory::create(config, num_heads, head_dim, max_seq_len, layer);
    size_t start = 0;
    std::vector<float> ck, cv;
    for (int n : chunks) {
        if (n < 0 || start + n > total)
            throw std::invalid_argument("reference_run: chunks exceed the tokens");
        ck.resize(static_cast<size_t>(num_heads) * n * d);
        cv.resize(ck.size());
        for (int h = 0; h < num_heads; ++h) {
            const size_t src = (h * total + start) * d, dst = static_cast<size_t>(h) * n * d;
            std::memcpy(&ck[dst], &k[src], n * d * sizeof(float));
            std::memcpy(&cv[dst], &v[src], n * d * sizeof(float));
        }
        cache->append(ck.data(), cv.data(), n);
        start += n;
    }
    const size_t hq = queries.shape(0), nq = queries.shape(1);
    std::vector<float> out(hq * nq * d), kd(num_heads * total * d), vd(kd.size());
    cache->attend(q.data(), static_cast<int>(hq), static_cast<int>(nq), out.data(), scale, causal);
    cache->dequantize(0, static_cast<int>(total), kd.data(), vd.data());
    const std::vector<size_t> kv_shape = {size_t(num_heads), total, d};
    return {copy_array(kd.data(), kv_shape), copy_array(vd.data(), kv_shape),
            copy_array(out.data(), {hq, nq, d})};
}

}  // namespace

void bind_calibration(nb::module_& m);  // bind_calibration.cpp
void bind_cuda(nb::module_& m);         // bind_cuda.cpp

NB_MODULE(_core, m) {
    m.doc() = "VeloxQuant C++ core (compressed KV caches); use the veloxquant package's API.";
    m.attr("TOKENS_PER_PAGE") = kTokensPerPage;
    m.attr("CENTER_MIN_TOKENS") = CenteredKeyCodec::kMinEstimateTokens;
    m.def("known_methods", &known_methods, "Names of every method the factory knows.");

    nb::exception<std::length_error>(m, "CapacityError", PyExc_ValueError);

    using Stats = KeyNormObserver::Stats;
    nb::class_<Stats>(m, "KeyNormStats",
                      "Running statistics of log key norms for one (layer, head).")
        .def(nb::init<>())
        .def_rw("count", &Stats::count)
        .def_rw("mean_log", &Stats::mean_log)
        .def_rw("m2_log", &Stats::m2_log)
        .def_rw("min_norm", &Stats::min_norm)
        .def_rw("max_norm", &Stats::max_norm)
        .def_prop_ro("std_log", &Stats::std_log)
        .def_prop_ro("heterogeneity_ratio", &Stats::heterogeneity_ratio);

    nb::class_<KeyNormObserver>(
        m, "KeyNormObserver",
        "Per-(layer, head) statistics of key norms. A token whose |log ||k|| - mean| exceeds "
        "z_threshold standard deviations (once min_count norms were seen) is an outlier and is "
        "kept at outlier_bits in a side store. Thread-safe; share one across a model's caches.")
        .def(nb::init<double, int64_t>(), "z_threshold"_a = 3.0, "min_count"_a = 32)
        .def_prop_ro("z_threshold", &KeyNormObserver::z_threshold)
        .def_prop_ro("min_count", &KeyNormObserver::min_count)
        .def(
            "observe",
            [](KeyNormObserver& o, int layer, int head, const InArray& norms) {
                o.observe(layer, head, norms.data(), static_cast<int>(norms.size()));
            },
            "layer"_a, "head"_a, "norms"_a, "Adds key norms (float32, any shape) of (layer, head).")
        .def("is_outlier", &KeyNormObserver::is_outlier, "layer"_a, "head"_a, "norm"_a)
        .def("stats", &KeyNormObserver::stats, "layer"_a, "head"_a)
        .def("set_stats", &KeyNormObserver::set_stats, "layer"_a, "head"_a, "stats"_a)
        .def("reset", &KeyNormObserver::reset);

    nb::class_<KVCacheConfig>(m, "KVCacheConfig",
                              "C++ KVCacheConfig (build it from the Python dataclass).")
        .def(nb::init<>())
        .def_rw("method", &KVCacheConfig::method)
        .def_rw("bits", &KVCacheConfig::bits)
        .def_rw("value_bits", &KVCacheConfig::value_bits)
        .def_rw("num_residuals", &KVCacheConfig::num_residuals)
        .def_rw("use_hadamard", &KVCacheConfig::use_hadamard)
        .def_prop_rw(
            "codebook", [](const KVCacheConfig& c) { return from_float_array(c.codebook); },
            [](KVCacheConfig& c, const InArray& a) { c.codebook = to_float_array(a); })
        .def_prop_rw(
            "smooth_factors",
            [](const KVCacheConfig& c) { return from_float_array(c.smooth_factors); },
            [](KVCacheConfig& c, const InArray& a) { c.smooth_factors = to_float_array(a); })
        .def_prop_rw(
            "rotations",
            [](const KVCacheConfig& c) {
                nb::list out;
                for (const auto& r : c.rotations) out.append(from_float_array(r));
                return out;
            },
            [](KVCacheConfig& c, const std::vector<InArray>& rs) {
                c.rotations.clear();
                for (const auto& r : rs) c.rotations.push_back(to_float_array(r));
            })
        .def_rw("bit_allocation", &KVCacheConfig::bit_allocation)
        .def_rw("outlier_observer", &KVCacheConfig::outlier_observer)
        .def_rw("outlier_bits", &KVCacheConfig::outlier_bits)
        .def_rw("sketch_dim", &KVCacheConfig::sketch_dim)
        .def_rw("num_clusters", &KVCacheConfig::num_clusters)
        .def_rw("num_subspaces", &KVCacheConfig::num_subspaces)
        .def_rw("use_fused_sdpa", &KVCacheConfig::use_fused_sdpa)
        .def_prop_rw(
            "ivf_centroids",
            [](const KVCacheConfig& c) { return from_float_array(c.ivf_centroids); },
            [](KVCacheConfig& c, const InArray& a) { c.ivf_centroids = to_float_array(a); })
        .def_rw("rope_inv_freq", &KVCacheConfig::rope_inv_freq)
        .def_rw("center_keys", &KVCacheConfig::center_keys)
        .def_rw("rope_half_split", &KVCacheConfig::rope_half_split)
        .def_rw("signal_bits", &KVCacheConfig::signal_bits)
        .def_rw("noise_bits", &KVCacheConfig::noise_bits)
        .def_rw("seed", &KVCacheConfig::seed)
        .def("validate", &KVCacheConfig::validate);

    nb::class_<KVCache>(m, "KVCache", "One layer's compressed key/value cache (C++).")
        .def("append", &append, "keys"_a, "values"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Encodes float32 [num_heads, n, head_dim] keys and values.")
        .def("attend", &attend, "queries"_a, "out"_a.noconvert(), "scale"_a, "causal"_a,
             nb::call_guard<nb::gil_scoped_release>(),
             "Attention of float32 [num_q_heads, n_queries, head_dim] queries, written to out.")
        .def("dequantize", &dequantize, "start"_a, "n_tokens"_a,
             "Reconstructed (keys, values) of tokens [start, start + n_tokens).")
        .def_prop_ro("size", &KVCache::size)
        .def_prop_ro("max_seq_len", &KVCache::max_seq_len)
        .def_prop_ro("nbytes", &KVCache::nbytes)
        .def("trim", &KVCache::trim, "n_tokens"_a)
        .def("reset", &KVCache::reset)
        .def("save", &KVCache::save, "path"_a, nb::call_guard<nb::gil_scoped_release>())
        .def_prop_ro("num_heads", &KVCache::num_heads)
        .def_prop_ro("head_dim", &KVCache::head_dim)
        .def_prop_ro("config", &KVCache::config, nb::rv_policy::copy)
        .def_prop_ro("class_name", &KVCache::class_name);

    nb::class_<QuantizedKVCache, KVCache>(m, "QuantizedKVCache")
        .def_prop_ro("layer", &QuantizedKVCache::layer)
        .def_prop_ro("storage_bytes", &QuantizedKVCache::storage_bytes)
        .def_prop_ro("parameter_bytes", &QuantizedKVCache::parameter_bytes)
        .def_prop_ro("key_bits_per_coordinate", &QuantizedKVCache::key_bits_per_coordinate)
        .def_prop_ro("value_bits_per_coordinate", &QuantizedKVCache::value_bits_per_coordinate)
        .def_prop_ro("outlier_tokens", &QuantizedKVCache::outlier_tokens);
    // Registered so that caches returned by the factory carry their dynamic type.
    nb::class_<TurboQuantRVQKVCache, QuantizedKVCache>(m, "TurboQuantRVQKVCache");
    nb::class_<QJLKVCache, QuantizedKVCache>(m, "QJLKVCache");
    nb::class_<PolarQuantKVCache, QuantizedKVCache>(m, "PolarQuantKVCache");
    nb::class_<RaBitQKVCache, QuantizedKVCache>(m, "RaBitQKVCache");
    nb::class_<CommVQKVCache, QuantizedKVCache>(m, "CommVQKVCache");
    nb::class_<RateQuantKVCache, QuantizedKVCache>(m, "RateQuantKVCache");
    nb::class_<SpectralQuantKVCache, QuantizedKVCache>(m, "SpectralQuantKVCache");
    nb::class_<VecInferKVCache, QuantizedKVCache>(m, "VecInferKVCache");
    nb::class_<FP16KVCache, QuantizedKVCache>(m, "FP16KVCache");

    nb::class_<SlidingWindowKVCache, KVCache>(m, "SlidingWindowKVCache")
        .def(nb::init<std::unique_ptr<QuantizedKVCache>, int, int>(), "inner"_a, "window"_a,
             "sink_tokens"_a = 4, "Takes ownership of inner (a QuantizedKVCache).")
        .def_prop_ro("window", &SlidingWindowKVCache::window)
        .def_prop_ro("sink_tokens", &SlidingWindowKVCache::sink_tokens)
        .def_prop_ro("layer", [](const SlidingWindowKVCache& c) { return c.inner().layer(); });

    m.def("create",
          nb::overload_cast<const KVCacheConfig&, int, int, int, int>(&KVCacheFactory::create),
          "config"_a, "num_heads"_a, "head_dim"_a, "max_seq_len"_a = 8192, "layer"_a = 0,
          "KVCacheFactory::create: the cache of config.method for one layer.");
    m.def("load", &KVCache::load, "path"_a, nb::call_guard<nb::gil_scoped_release>(),
          "Reads a cache written by save().");

    nb::class_<LlamaModel>(m, "LlamaModel", "A Llama-family GGUF model run by the C++ runtime.")
        .def_static("load", &LlamaModel::load, "path"_a, nb::call_guard<nb::gil_scoped_release>(),
                    "Loads and validates a GGUF file.")
        .def(
            "cache_shape",
            [](const LlamaModel& model) {
                std::vector<std::pair<int, int>> shape;
                for (const auto& l : model.cache_shape().layers)
                    shape.emplace_back(l.num_kv_heads, l.head_dim);
                return shape;
            },
            "(num_kv_heads, head_dim) of every layer, for KVCacheBuilder.build.")
        .def_prop_ro("n_layer", [](const LlamaModel& model) { return model.hparams().n_layer; })
        .def_prop_ro("n_vocab", [](const LlamaModel& model) { return model.hparams().n_vocab; })
        .def_prop_ro("weight_bytes", &LlamaModel::weight_bytes);
    bind_calibration(m);

    bind_cuda(m);

    nb::module_ dbg = m.def_submodule("_debug", "Internals for the test suite's numpy references.");
    dbg.def("page_regions", &page_regions, "cache"_a, "page"_a, "head"_a,
            "Copies of one head's key codes [P, bytes], key scalars [k, P], value codes and value "
            "scalars in one page of packed storage.");
    dbg.def("scalar_codebook", &scalar_codebook, "law"_a, "d"_a, "bits"_a, "index"_a = 0,
            "(centroids, boundaries) of the 'rotated' coordinate law, the 'residual' law of stage "
            "index, or the 'polar' angle law of level index.");
    dbg.def("reference_run", &reference_run, "config"_a, "num_heads"_a, "head_dim"_a,
            "max_seq_len"_a, "layer"_a, "keys"_a, "values"_a, "chunks"_a, "queries"_a, "scale"_a,
            "causal"_a,
            "A cache run entirely in C++ on copies of the inputs: (keys, values, attention).");
}
