// nanobind bindings of the CUDA backend (the build's VQ_CUDA=ON defines VQ_WITH_CUDA): the two
// device-resident caches of one layer and one sequence,
//   CudaTurboQuantCache  turboquant_rvq, head_dim 64/128, tensor-core decode (one query a head);
//   CudaCodecCache       every method, head_dim up to 256, decode and causal prefill on the codes;
// and CudaTurboQuantBatch / CudaCodecBatch, the decode steps of many sequences' caches at once.
// Their arrays are C-contiguous float32 CUDA ndarrays (torch CUDA tensors through DLPack,
// zero-copy) on the cache's device, checked here so that errors name the cause; work is queued on
// the stream the caller passes (a cudaStream_t as an integer: torch's current stream), with the
// cache's device made current for the call. Errors map as in bindings.cpp (std::invalid_argument
// -> ValueError, std::length_error -> CapacityError, std::out_of_range -> IndexError).
// Without VQ_WITH_CUDA only HAS_CUDA (False) and cuda_device_count (0) are bound.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "bind_arrays.h"
#include "veloxquant/config.h"

#ifdef VQ_WITH_CUDA
#include <cuda_runtime.h>

#include "cache/paged_store.h"
#include "cuda/codec_batch.h"
#include "cuda/codec_cache.h"
#include "cuda/cuda_cache.h"
#include "cuda/turboquant_batch.h"
#include "veloxquant/caches.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;
using namespace veloxquant;

#ifdef VQ_WITH_CUDA
namespace {

using bind::new_array;
using bind::Numpy;
using cuda::CudaCodecBatch;
using cuda::CudaCodecCache;
using cuda::CudaTurboQuantBatch;
using cuda::CudaTurboQuantCache;
/// Any ndarray: device, dtype, shape and layout are checked here so that errors name the cause.
using AnyArray = nb::ndarray<>;

std::string dtype_name(const nb::dlpack::dtype& t) {
    const char* kind = t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)    ? "float"
                       : t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) ? "bfloat"
                       : t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int)    ? "int"
                       : t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::UInt)   ? "uint"
                                                                                        : "other";
    return std::string(kind) + std::to_string(t.bits);
}

std::string shape_string(const AnyArray& a) {
    std::string s = "[";
    for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + "]";
}

/// Checks that `a` is a C-contiguous float32 array on the cache's CUDA device and returns its
/// data pointer.
template <class Cache>
float* cuda_float_data(const Cache& c, const AnyArray& a, const char* name) {
    if (a.device_type() != nb::device::cuda::value)
        throw std::invalid_argument(std::string(name) +
                                    " must be a CUDA tensor (DLPack device type 2, e.g. torch "
                                    "device 'cuda'); got device type " +
                                    std::to_string(a.device_type()) +
                                    (a.device_type() == 1 ? " (CPU)" : ""));
    if (a.device_id() != c.device())
        throw std::invalid_argument(std::string(name) + " is on CUDA device " +
                                    std::to_string(a.device_id()) +
                                    " but the cache lives on device " + std::to_string(c.device()));
    if (a.dtype() != nb::dtype<float>())
        throw std::invalid_argument(std::string(name) + " must be float32, got " +
                                    dtype_name(a.dtype()) +
                                    " (convert on the device first, e.g. tensor.float())");
    int64_t expect = 1;
    for (size_t i = a.ndim(); i-- > 0;) {
        if (a.shape(i) != 1 && a.stride(i) != expect)
            throw std::invalid_argument(std::string(name) +
                                        " must be C-contiguous (call .contiguous() on the tensor)");
        expect *= static_cast<int64_t>(a.shape(i));
    }
    return static_cast<float*>(a.data());
}

/// [num_heads][n][head_dim] (or with a leading batch of 1): returns n.
template <class Cache>
int cuda_token_count(const Cache& c, const AnyArray& a, const char* name) {
    const size_t nd = a.ndim();
    const bool ok = (nd == 3 || (nd == 4 && a.shape(0) == 1)) &&
                    a.shape(nd - 3) == static_cast<size_t>(c.num_heads()) &&
                    a.shape(nd - 1) == static_cast<size_t>(c.head_dim());
    if (!ok)
        throw std::invalid_argument(std::string(name) +
                                    " must be [num_heads=" + std::to_string(c.num_heads()) +
                                    ", n_tokens, head_dim=" + std::to_string(c.head_dim()) +
                                    "] (or with a leading batch of 1), got " + shape_string(a));
    return static_cast<int>(a.shape(nd - 2));
}

/// Decode queries of CudaTurboQuantCache: [num_q_heads][head_dim], [num_q_heads][1][head_dim]
/// or [1][num_q_heads][1][head_dim]; returns num_q_heads.
int decode_query_heads(const CudaTurboQuantCache& c, const AnyArray& a) {
    const size_t nd = a.ndim();
    bool ok = nd >= 2 && nd <= 4 && a.shape(nd - 1) == static_cast<size_t>(c.head_dim());
    if (ok && nd >= 3) ok = a.shape(nd - 2) == 1;
    if (ok && nd == 4) ok = a.shape(0) == 1;
    if (!ok)
        throw std::invalid_argument(
            "queries must be [num_q_heads, head_dim=" + std::to_string(c.head_dim()) +
            "] or [num_q_heads, 1, head_dim] (decode: one query per head), got " + shape_string(a));
    return static_cast<int>(a.shape(nd == 4 ? 1 : 0));
}

/// Queries of CudaCodecCache: [num_q_heads][n_queries][head_dim] (or with a leading batch of
/// 1); returns (num_q_heads, n_queries).
std::pair<int, int> query_shape(const CudaCodecCache& c, const AnyArray& a) {
    const size_t nd = a.ndim();
    const bool ok = (nd == 3 || (nd == 4 && a.shape(0) == 1)) &&
                    a.shape(nd - 1) == static_cast<size_t>(c.head_dim());
    if (!ok)
        throw std::invalid_argument(
            "queries must be [num_q_heads, n_queries, head_dim=" + std::to_string(c.head_dim()) +
            "] (or with a leading batch of 1), got " + shape_string(a));
    return {static_cast<int>(a.shape(nd - 3)), static_cast<int>(a.shape(nd - 2))};
}

void check_shaped_like(const AnyArray& out, const AnyArray& queries) {
    bool same = out.ndim() == queries.ndim();
    for (size_t i = 0; same && i < out.ndim(); ++i) same = out.shape(i) == queries.shape(i);
    if (!same)
        throw std::invalid_argument("out must be shaped like the queries " + shape_string(queries) +
                                    ", got " + shape_string(out));
}

cudaStream_t as_stream(uintptr_t stream) {
    return reinterpret_cast<cudaStream_t>(stream);
}

/// Makes the cache's device current for the scope of a call (torch may have another current).
struct DeviceScope {
    int previous = -1;
    explicit DeviceScope(int device) {
        cuda::check_cuda(cudaGetDevice(&previous), "cudaGetDevice");
        if (previous != device) cuda::check_cuda(cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceScope() {
        int now = -1;
        if (cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
    }
};

template <class Cache>
void cuda_append(Cache& c, const AnyArray& keys, const AnyArray& values, uintptr_t stream) {
    const int n = cuda_token_count(c, keys, "keys");
    if (cuda_token_count(c, values, "values") != n)
        throw std::invalid_argument("keys and values must hold the same number of tokens");
    const float* k = cuda_float_data(c, keys, "keys");
    const float* v = cuda_float_data(c, values, "values");
    nb::gil_scoped_release release;
    DeviceScope scope(c.device());
    c.append(k, v, n, as_stream(stream));
}

template <class Cache>
void cuda_dequantize(const Cache& c, int start, const AnyArray& keys, const AnyArray& values,
                     uintptr_t stream) {
    const int n = cuda_token_count(c, keys, "keys");
    if (cuda_token_count(c, values, "values") != n)
        throw std::invalid_argument("keys and values must hold the same number of tokens");
    float* k = cuda_float_data(c, keys, "keys");
    float* v = cuda_float_data(c, values, "values");
    nb::gil_scoped_release release;
    DeviceScope scope(c.device());
    c.dequantize(start, n, k, v, as_stream(stream));
}

void turboquant_attend(const CudaTurboQuantCache& c, const AnyArray& queries, const AnyArray& out,
                       float scale, uintptr_t stream) {
    const int hq = decode_query_heads(c, queries);
    check_shaped_like(out, queries);
    const float* q = cuda_float_data(c, queries, "queries");
    float* o = cuda_float_data(c, out, "out");
    if (c.size() == 0) throw std::invalid_argument("attend: the cache holds no tokens");
    nb::gil_scoped_release release;
    DeviceScope scope(c.device());
    c.attend(q, hq, o, scale, as_stream(stream));
}

void codec_attend(CudaCodecCache& c, const AnyArray& queries, const AnyArray& out, float scale,
                  bool causal, uintptr_t stream) {
    const auto [hq, n] = query_shape(c, queries);
    check_shaped_like(out, queries);
    const float* q = cuda_float_data(c, queries, "queries");
    float* o = cuda_float_data(c, out, "out");
    nb::gil_scoped_release release;
    DeviceScope scope(c.device());
    c.attend(q, hq, n, o, scale, causal, as_stream(stream));
}

/// The first of a batch's caches (each entry a cache: None is refused here).
template <class P>
const auto& first_of(const std::vector<P>& caches) {
    if (caches.empty()) throw std::invalid_argument("a batch needs at least one cache");
    for (size_t b = 0; b < caches.size(); ++b)
        if (caches[b] == nullptr)
            throw std::invalid_argument("cache " + std::to_string(b) + " of the batch is None");
    return *caches[0];
}

/// [batch][...inner] with `inner` the shape of one sequence's array (-1: any extent).
void check_batched(const AnyArray& a, size_t batch, std::initializer_list<long long> inner,
                   const char* name, const char* expected) {
    bool ok = a.ndim() == inner.size() + 1 && a.shape(0) == batch;
    size_t i = 1;
    for (const long long extent : inner) {
        if (ok && extent >= 0) ok = a.shape(i) == static_cast<size_t>(extent);
        ++i;
    }
    if (!ok)
        throw std::invalid_argument(std::string(name) + " must be " + expected + " for " +
                                    std::to_string(batch) + " caches, got " + shape_string(a));
}

/// Batch::append for keys and values [batch][num_heads][n][head_dim].
template <class Batch, class Cache>
void batch_append(Batch& step, const std::vector<Cache*>& caches, const AnyArray& keys,
                  const AnyArray& values, uintptr_t stream) {
    const Cache& c = first_of(caches);
    const long long heads = c.num_heads(), d = c.head_dim();
    const char* expected = "[batch, num_heads, n_tokens, head_dim]";
    check_batched(keys, caches.size(), {heads, -1, d}, "keys", expected);
    check_batched(values, caches.size(), {heads, static_cast<long long>(keys.shape(2)), d},
                  "values", expected);
    const float* k = cuda_float_data(c, keys, "keys");
    const float* v = cuda_float_data(c, values, "values");
    nb::gil_scoped_release release;
    DeviceScope scope(c.device());
    step.append(caches, k, v, static_cast<int>(keys.shape(2)), as_stream(stream));
}

/// Batch::attend for decode queries [batch][num_q_heads][head_dim] (P: the batch's cache
/// pointer type).
template <class Batch, class P>
void batch_attend(Batch& step, const std::vector<P>& caches, const AnyArray& queries,
                  const AnyArray& out, float scale, uintptr_t stream) {
    const auto& c = first_of(caches);
    check_batched(queries, caches.size(), {-1, c.head_dim()}, "queries",
                  "[batch, num_q_heads, head_dim] (decode: one query per head)");
    check_shaped_like(out, queries);
    const float* q = cuda_float_data(c, queries, "queries");
    float* o = cuda_float_data(c, out, "out");
    nb::gil_scoped_release release;
    DeviceScope scope(c.device());
    step.attend(caches, q, static_cast<int>(queries.shape(1)), o, scale, as_stream(stream));
}

/// Throws unless 0 <= page < the pages that hold tokens and the page is held (not evicted by a
/// sliding window).
template <class Cache>
void check_page(const Cache& c, int page) {
    const int held = (c.size() + kTokensPerPage - 1) / kTokensPerPage;
    if (page < 0 || page >= held)
        throw std::out_of_range("page " + std::to_string(page) + " is outside the " +
                                std::to_string(held) + " pages that hold tokens");
    if (!c.position_held(page * kTokensPerPage))
        throw std::out_of_range("page " + std::to_string(page) +
                                " was evicted by the sliding window");
}

Numpy<uint8_t> turboquant_page(const CudaTurboQuantCache& c, int page) {
    check_page(c, page);
    Numpy<uint8_t> out = new_array<uint8_t>({static_cast<size_t>(c.layout().page_bytes)});
    {
        nb::gil_scoped_release release;
        DeviceScope scope(c.device());
        c.copy_page(page, out.data());
    }
    return out;
}

Numpy<uint8_t> codec_page(const CudaCodecCache& c, int page) {
    check_page(c, page);
    Numpy<uint8_t> out = new_array<uint8_t>({c.page_layout().page_bytes});
    {
        nb::gil_scoped_release release;
        DeviceScope scope(c.device());
        PagedStore store(c.page_layout());
        c.download(store);
        std::memcpy(out.data(), store.page_data(page), c.page_layout().page_bytes);
    }
    return out;
}

nb::dict layout_dict(const PageLayout& pl) {
    nb::list heads;
    for (const HeadLayout& h : pl.heads) {
        nb::dict d;
        d["key_code_bytes"] = h.key_code_bytes;
        d["key_codes_offset"] = h.key_codes_offset;
        d["key_scalars"] = h.key_scalars;
        d["key_scalars_offset"] = h.key_scalars_offset;
        d["value_code_bytes"] = h.value_code_bytes;
        d["value_codes_offset"] = h.value_codes_offset;
        d["value_scalars"] = h.value_scalars;
        d["value_scalars_offset"] = h.value_scalars_offset;
        heads.append(d);
    }
    nb::dict d;
    d["tokens_per_page"] = pl.tokens_per_page;
    d["page_bytes"] = pl.page_bytes;
    d["heads"] = heads;
    return d;
}

/// What both device caches bind alike.
template <class Cache>
void def_device_cache(nb::class_<Cache>& cls) {
    cls.def(nb::init<const KVCacheConfig&, int, int, int, int, int, int>(), "config"_a,
            "num_heads"_a, "head_dim"_a, "max_seq_len"_a = 8192, "layer"_a = 0, "window"_a = 0,
            "sink_tokens"_a = 4)
        .def("append", &cuda_append<Cache>, "keys"_a, "values"_a, "stream"_a = 0,
             "Encodes [num_heads, n, head_dim] keys and values (CapacityError past max_seq_len).")
        .def("dequantize", &cuda_dequantize<Cache>, "start"_a, "keys"_a, "values"_a, "stream"_a = 0,
             "Reconstructs tokens [start, start + n) into keys and values [num_heads, n, "
             "head_dim].")
        .def("reset", &Cache::reset)
        .def("truncate", &Cache::truncate, "n_tokens"_a)
        .def_prop_ro("layout", [](const Cache& c) { return layout_dict(c.page_layout()); })
        .def_prop_ro("size", &Cache::size)
        .def_prop_ro("max_seq_len", &Cache::max_seq_len)
        .def_prop_ro("num_heads", &Cache::num_heads)
        .def_prop_ro("head_dim", &Cache::head_dim)
        .def_prop_ro("device", &Cache::device)
        .def_prop_ro("nbytes", &Cache::nbytes)
        .def_prop_ro("window", &Cache::window)
        .def_prop_ro("sink_tokens", &Cache::sink_tokens)
        .def("position_held", &Cache::position_held, "pos"_a,
             "Whether position pos is stored (not evicted by the sliding window).")
        .def(
            "to_host",
            [](const Cache& c) -> std::unique_ptr<KVCache> {
                nb::gil_scoped_release release;
                DeviceScope scope(c.device());
                return c.host_cache();
            },
            "A CPU cache holding these pages and learned codec state, in a SlidingWindowKVCache "
            "where this cache has a window (synchronous).")
        .def(
            "save",
            [](const Cache& c, const std::string& path) {
                nb::gil_scoped_release release;
                DeviceScope scope(c.device());
                c.save(path);
            },
            "path"_a, "Writes the cache file of to_host() (versioned, checksummed, atomic).")
        .def_static(
            "from_host",
            [](const KVCache& cpu) {
                nb::gil_scoped_release release;
                return Cache::from_host(cpu);
            },
            "cpu"_a,
            "A device cache (on the current device) holding a CPU cache's pages (a quantized "
            "cache, or a SlidingWindowKVCache around one).");
}

/// What both batch classes bind alike (P: the pointer type their attend takes).
template <class Batch, class Cache, class P>
void def_device_batch(nb::class_<Batch>& cls) {
    cls.def(nb::init<>())
        .def("append", &batch_append<Batch, Cache>, "caches"_a, "keys"_a, "values"_a,
             "stream"_a = 0,
             "Encodes [batch, num_heads, n, head_dim] keys and values, sequence b's into "
             "caches[b]; all or nothing (ValueError, CapacityError).")
        .def("attend", &batch_attend<Batch, P>, "caches"_a, "queries"_a, "out"_a, "scale"_a,
             "stream"_a = 0,
             "Decode attention of [batch, num_q_heads, head_dim] queries, sequence b's over "
             "caches[b], written to out (shaped like the queries), in one launch of each kernel.")
        .def_prop_ro("nbytes", &Batch::nbytes);
}

}  // namespace
#endif  // VQ_WITH_CUDA

void bind_cuda(nb::module_& m) {
#ifdef VQ_WITH_CUDA
    m.attr("HAS_CUDA") = true;
    m.def(
        "cuda_device_count",
        []() {
            int n = 0;
            return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
        },
        "CUDA devices visible to this process (0 when the driver or a device is missing).");

    nb::class_<CudaTurboQuantCache> turboquant(
        m, "CudaTurboQuantCache",
        "One layer's turboquant_rvq cache of one sequence, resident on the current CUDA device. "
        "Arrays are C-contiguous float32 CUDA arrays (torch tensors through DLPack); stream is a "
        "cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream), 0 = the default.");
    def_device_cache(turboquant);
    turboquant
        .def("attend", &turboquant_attend, "queries"_a, "out"_a, "scale"_a, "stream"_a = 0,
             "Decode attention of one query per query head ([num_q_heads, head_dim]) over every "
             "stored token, written to out (shaped like the queries).")
        .def("page", &turboquant_page, "page"_a,
             "The bytes of one page of the pool (synchronous).");

    nb::class_<CudaTurboQuantBatch> turboquant_batch(
        m, "CudaTurboQuantBatch",
        "Decode steps of a batch of sequences, one CudaTurboQuantCache each (one layer's, alike): "
        "one input check for every new token and one decode launch for every sequence. Arrays and "
        "stream as CudaTurboQuantCache's, on the caches' device.");
    def_device_batch<CudaTurboQuantBatch, CudaTurboQuantCache, const CudaTurboQuantCache*>(
        turboquant_batch);

    nb::class_<CudaCodecBatch> codec_batch(
        m, "CudaCodecBatch",
        "Decode steps of a batch of sequences, one CudaCodecCache each (one layer's, alike): one "
        "input check and one encode launch for every new token and one launch of each attention "
        "kernel for every sequence. Arrays and stream as CudaCodecCache's, on the caches' device.");
    def_device_batch<CudaCodecBatch, CudaCodecCache, CudaCodecCache*>(codec_batch);
    codec_batch.def_static(
        "alike",
        [](const std::vector<const CudaCodecCache*>& caches) {
            first_of(caches);
            return CudaCodecBatch::alike(caches);
        },
        "caches"_a,
        "Whether the caches can attend in one launch (one config, layer, shape and device, every "
        "codec trained; what each learned from its own tokens may differ).");

    nb::class_<CudaCodecCache> codec(
        m, "CudaCodecCache",
        "One layer's cache of any method for one sequence, resident on the current CUDA device "
        "(head_dim up to 256). Arrays and stream as CudaTurboQuantCache's.");
    def_device_cache(codec);
    codec
        .def("attend", &codec_attend, "queries"_a, "out"_a, "scale"_a, "causal"_a, "stream"_a = 0,
             "Attention of [num_q_heads, n_queries, head_dim] queries over every stored token, on "
             "the codes, written to out (shaped like the queries); with causal the queries are "
             "the last n_queries tokens appended.")
        .def("page", &codec_page, "page"_a,
             "The bytes of one page (downloads every page; synchronous).")
        .def_prop_ro("outlier_tokens", &CudaCodecCache::outlier_tokens);
#else
    m.attr("HAS_CUDA") = false;
    m.def(
        "cuda_device_count", []() { return 0; },
        "0: this build has no CUDA backend (VQ_CUDA=OFF).");
#endif
}
