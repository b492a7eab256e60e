// Parity of the CUDA backend with the CPU reference on random inputs of several shapes:
// encoded codes (identical up to exact ties), dequantize (1e-5), decode attention (relative
// error 1e-3) on the same codes, the batched launcher with a shuffled page table (also with
// each count of lookup-table copies in shared memory), and the
// device cache end to end against TurboQuantRVQKVCache. Every device test skips cleanly when
// no CUDA device is present; the host tables' check and the launchers' argument checks run
// everywhere.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/paged_attention.h"
#include "cache/paged_store.h"
#include "core/bitpack.h"
#include "core/rng.h"
#include "cuda/cuda_cache.h"
#include "cuda_test_helpers.h"
#include "methods/key_codec.h"
#include "methods/value_codec.h"
#include "test_helpers.h"
#include "veloxquant/caches.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;
using vqtest::has_device;
using vqtest::random_tokens;
using vqtest::relative_error;

struct Shape {
    int d, bits, stages, value_bits, heads;
};

std::string name(const Shape& s) {
    return "d" + std::to_string(s.d) + " k" + std::to_string(s.bits) + "x" +
           std::to_string(s.stages) + " v" + std::to_string(s.value_bits) + " h" +
           std::to_string(s.heads);
}

// Covers head dims 64/128, key bits 1..4, stages 1..3, value bits 1, 2, 4, 16.
const std::vector<Shape> kShapes = {
    {128, 1, 1, 2, 8}, {128, 2, 2, 4, 2},  {128, 3, 1, 1, 1}, {128, 4, 3, 16, 2},
    {128, 4, 1, 4, 3}, {64, 1, 2, 4, 2},   {64, 2, 1, 16, 1}, {64, 3, 3, 2, 2},
    {64, 4, 2, 1, 4},  {128, 1, 3, 16, 1}, {64, 4, 1, 2, 2},
};

KVCacheConfig make_config(const Shape& s, uint64_t seed) {
    KVCacheConfig c;
    c.method = "turboquant_rvq";
    c.bits = s.bits;
    c.num_residuals = s.stages;
    c.value_bits = s.value_bits;
    c.seed = seed;
    return c;
}

// The codecs and store a QuantizedKVCache of this config builds, with its per-page encode.
struct CpuReference {
    std::vector<std::unique_ptr<KeyCodec>> keys;
    std::vector<std::unique_ptr<ValueCodec>> values;
    PagedStore store;
    int heads, d, size = 0;

    CpuReference(const KVCacheConfig& c, int heads_, int d_, const PageLayout& layout)
        : store(layout), heads(heads_), d(d_) {
        for (int h = 0; h < heads; ++h) {
            keys.push_back(make_key_codec(c, d, 0, h));
            values.push_back(std::make_unique<ValueCodec>(
                d, c.value_bits, c.use_hadamard,
                derive_seed(c.seed, 0, h, d, RandomPurpose::kValueRotation)));
        }
    }

    void append(const std::vector<float>& k, const std::vector<float>& v, int n) {
        const int P = kTokensPerPage;
        store.reserve_tokens(size + n);
        for (int h = 0; h < heads; ++h) {
            for (int t = size; t < size + n;) {
                const int p = t / P, slot = t % P, cnt = std::min(P - slot, size + n - t);
                const std::size_t src = (static_cast<std::size_t>(h) * n + (t - size)) * d;
                keys[h]->encode(&k[src], cnt, store.key_codes(p, h) + slot * keys[h]->code_bytes(),
                                store.key_scalars(p, h) + slot, P);
                values[h]->encode(&v[src], cnt,
                                  store.value_codes(p, h) + slot * values[h]->code_bytes(),
                                  store.value_scalars(p, h) + slot, P);
                t += cnt;
            }
        }
        size += n;
    }

    std::vector<float> attend(const std::vector<float>& q, int num_q_heads, float scale) const {
        std::vector<float> out(static_cast<std::size_t>(num_q_heads) * d);
        PagedAttentionArgs a;
        a.store = &store;
        a.key_codecs = &keys;
        a.value_codecs = &values;
        a.num_heads = heads;
        a.head_dim = d;
        a.size = size;
        a.queries = q.data();
        a.num_q_heads = num_q_heads;
        a.n_queries = 1;
        a.out = out.data();
        a.scale = scale;
        a.causal = true;
        paged_attention(a);
        return out;
    }
};

TEST(CudaParity, RejectsShapesOutsideScope) {
    Shape s{128, 1, 1, 2, 2};
    KVCacheConfig c = make_config(s, 1);
    c.bits = 5;
    EXPECT_THROW(CudaTurboQuantCache(c, 2, 128), std::invalid_argument);
    c = make_config(s, 1);
    EXPECT_THROW(CudaTurboQuantCache(c, 2, 96), std::invalid_argument);
    c.value_bits = 3;
    EXPECT_THROW(CudaTurboQuantCache(c, 2, 128), std::invalid_argument);
    c = make_config(s, 1);
    c.method = "qjl";
    EXPECT_THROW(CudaTurboQuantCache(c, 2, 128), std::invalid_argument);
}

// The decode scores 2-bit keys in integers: each centroid C[a] of a stage as K = 256 high + low,
// high and low signed bytes a of the stage's two key_i8 words, K = rint(C[a] / max|C| * 32512),
// with max|C| the stage's (key_i8) or the largest of any stage's (key_i8_joint, whose weight
// is that max / 32512). Host only: rebuilds every centroid from the bytes.
TEST(CudaParity, KeyI8PartsRebuildTheCentroids) {
    for (int d : {64, 128}) {
        for (int stages : {1, 2, 3}) {
            const TqHostTables t = make_host_tables(make_config({d, 2, stages, 4, 1}, 7), 1, d, 0);
            ASSERT_EQ(t.key_i8.size(), static_cast<std::size_t>(2 * stages));
            ASSERT_EQ(t.key_i8_joint.size(), static_cast<std::size_t>(2 * stages));
            float top = 0.0f;
            for (float c : t.key_centroids) top = std::max(top, std::abs(c));
            EXPECT_EQ(t.key_i8_joint_weight, top / 32512.0f);
            for (int s = 0; s < stages; ++s) {
                for (bool joint : {false, true}) {
                    const std::vector<uint32_t>& words = joint ? t.key_i8_joint : t.key_i8;
                    const float scale = joint ? top : t.key_affine[2 * s + 1];  // max|C|
                    for (int a = 0; a < 4; ++a) {
                        const int high = static_cast<int8_t>(words[2 * s] >> (8 * a));
                        const int low = static_cast<int8_t>(words[2 * s + 1] >> (8 * a));
                        EXPECT_LE(std::abs(high), 127);
                        const double c = t.key_centroids[4 * s + a];
                        EXPECT_NEAR((256.0 * high + low) / 32512.0 * scale, c,
                                    0.5 / 32512.0 * scale + 1e-7)
                            << "d " << d << " stage " << s << " index " << a << " joint " << joint;
                    }
                }
            }
        }
    }
}

// A decode whose tables lack one the layout needs, or whose value table scale is not a positive
// number, is refused before anything runs (host only: the check comes before any device call;
// the stand-in pointers are never read).
TEST(CudaParity, DecodeRefusesMissingTables) {
    const TqHostTables host = make_host_tables(make_config({128, 2, 2, 4, 2}, 3), 2, 128, 0);
    std::vector<float> stand_in(16);
    const auto* words = reinterpret_cast<const uint32_t*>(stand_in.data());
    DecodeArgs a;
    a.layout = host.layout;
    a.tables.key_signs = a.tables.value_signs = a.tables.key_affine = stand_in.data();
    a.tables.key_pairs = a.tables.value_pairs = a.tables.key_i8 = a.tables.key_i8_joint = words;
    a.pool = reinterpret_cast<const uint8_t*>(stand_in.data());
    a.page_table = reinterpret_cast<const int32_t*>(stand_in.data());
    a.page_table_stride = 2;
    a.max_seq_len = a.seq_len = 128;
    a.batch = 1;
    a.group = 4;
    a.queries = stand_in.data();
    a.out = stand_in.data();
    for (int missing = 0; missing < 4; ++missing) {
        DecodeArgs b = a;
        (missing == 0   ? b.tables.key_i8
         : missing == 1 ? b.tables.key_pairs
         : missing == 2 ? b.tables.key_i8_joint
                        : b.tables.value_pairs) = nullptr;
        EXPECT_EQ(launch_decode_attention(b, nullptr), cudaErrorInvalidValue)
            << "missing table " << missing;
        EXPECT_EQ(decode_workspace_bytes(b), 0u);
    }
    // The value table's scale enters the softmax as its log2: zero, infinite or NaN is refused.
    for (float scale : {0.0f, -1.0f, std::numeric_limits<float>::infinity(), std::nanf("")}) {
        DecodeArgs b = a;
        b.tables.value_pair_scale = scale;
        EXPECT_EQ(launch_decode_attention(b, nullptr), cudaErrorInvalidValue) << "scale " << scale;
        EXPECT_EQ(decode_workspace_bytes(b), 0u);
    }
}

// An encode's batch (EncodeArgs::pools and starts, device arrays) is for the short appends'
// encoder: both arrays or neither, batch >= 1, and under kShortAppendTokens tokens a sequence;
// anything else is refused before any device call (host only: the stand-ins are never read).
TEST(CudaParity, EncodeRefusesMalformedBatches) {
    const TqHostTables host = make_host_tables(make_config({128, 1, 1, 2, 2}, 3), 2, 128, 0);
    std::vector<float> stand_in(16);
    std::vector<uint8_t*> pools(2, reinterpret_cast<uint8_t*>(stand_in.data()));
    const std::vector<int32_t> starts(2, 0);
    EncodeArgs a;
    a.layout = host.layout;
    a.page_table = starts.data();
    a.keys = a.values = stand_in.data();
    a.pools = pools.data();
    a.starts = starts.data();
    a.batch = 2;
    a.n_tokens = 0;  // well formed, and nothing to encode: no launch
    EXPECT_EQ(launch_encode(a, nullptr), cudaSuccess);
    EncodeArgs b = a;
    b.n_tokens = kShortAppendTokens;  // a prefill's batch: the bulk encoders take one sequence
    EXPECT_EQ(launch_encode(b, nullptr), cudaErrorInvalidValue);
    b = a, b.starts = nullptr;
    EXPECT_EQ(launch_encode(b, nullptr), cudaErrorInvalidValue);
    b = a, b.pools = nullptr;
    EXPECT_EQ(launch_encode(b, nullptr), cudaErrorInvalidValue);
    b = a, b.batch = 0;
    EXPECT_EQ(launch_encode(b, nullptr), cudaErrorInvalidValue);
    b = a, b.pools = nullptr, b.starts = nullptr;  // no arrays: one sequence, so batch 1
    b.pool = reinterpret_cast<uint8_t*>(stand_in.data());
    EXPECT_EQ(launch_encode(b, nullptr), cudaErrorInvalidValue);
    b.batch = 1;
    EXPECT_EQ(launch_encode(b, nullptr), cudaSuccess);
}

// Today's layouts of the three benchmarked decodes take the mixed-row kernels on sm_90 at head
// dims 64 and 128: were a layout change to move a block, decodes would fall back to the general
// kernels, correct but slower, and only the benchmarks would show it. Host only.
TEST(CudaParity, BenchmarkedLayoutsTakeTheMixedRows) {
    std::vector<float> stand_in(16);
    const auto* words = reinterpret_cast<const uint32_t*>(stand_in.data());
    const auto* other_words = words + 8;
    for (const int d : {64, 128}) {
        for (const Shape& s : {Shape{d, 1, 1, 2, 8}, Shape{d, 4, 1, 4, 8}, Shape{d, 2, 2, 4, 8}}) {
            SCOPED_TRACE(name(s));
            const TqHostTables host = make_host_tables(make_config(s, 5), s.heads, d, 0);
            DecodeArgs a;
            a.layout = host.layout;
            a.group = 4;
            a.tables.key_pairs = words;
            // as the device cache does: one pointer where the key and value pair tables are equal
            const bool same = !host.value_pairs.empty() &&
                              host.key_pairs.size() >= host.value_pairs.size() &&
                              std::equal(host.value_pairs.begin(), host.value_pairs.end(),
                                         host.key_pairs.begin());
            a.tables.value_pairs = same ? words : other_words;
            EXPECT_TRUE(decode_takes_mixed_rows(a, 9));
            EXPECT_FALSE(decode_takes_mixed_rows(a, 8));  // sm_80: the general kernels
            DecodeArgs forced = a;
            forced.table_copies = 1;  // forced contiguous tables
            EXPECT_FALSE(decode_takes_mixed_rows(forced, 9));
            DecodeArgs eight = a;  // groups of 8 (two blocks of integer scores) take them too
            eight.group = 8;
            EXPECT_TRUE(decode_takes_mixed_rows(eight, 9));
        }
    }
}

TEST(CudaParity, EncodedCodesMatchCpu) {
    SKIP_WITHOUT_DEVICE();
    uint64_t seed = 11;
    for (const Shape& s : kShapes) {
        SCOPED_TRACE(name(s));
        const KVCacheConfig c = make_config(s, seed);
        CudaTurboQuantCache gpu(c, s.heads, s.d, 4096);
        CpuReference cpu(c, s.heads, s.d, gpu.page_layout());
        // Unaligned starts, page crossings, and short appends (the decode-step encoder).
        for (int n : {37, 150, 5, 64, 1}) {
            auto k = random_tokens(s.heads, n, s.d, ++seed, 1.5f),
                 v = random_tokens(s.heads, n, s.d, ++seed, 1.5f);
            if (n ==
                37) {  // a zero key and value (all-zero value codes and scale), a subnormal one
                std::fill(k.begin() + 3 * s.d, k.begin() + 4 * s.d, 0.0f),
                    std::fill(v.begin() + 3 * s.d, v.begin() + 4 * s.d, 0.0f);
                for (int j = 0; j < s.d; ++j)
                    k[5 * s.d + j] = v[5 * s.d + j] = (j % 3 - 1) * 3e-40f;
            }
            DeviceBuffer<float> dk(k), dv(v);
            gpu.append(dk.get(), dv.get(), n, nullptr);
            cpu.append(k, v, n);
        }
        PagedStore got(gpu.page_layout());
        gpu.download(got);
        long long coords = 0, mismatches = 0, scalar_mismatches = 0;
        for (int pos = 0; pos < cpu.size; ++pos) {
            const int p = pos / kTokensPerPage, slot = pos % kTokensPerPage;
            for (int h = 0; h < s.heads; ++h) {
                const std::size_t kcb = cpu.keys[h]->code_bytes(),
                                  vcb = cpu.values[h]->code_bytes();
                const uint8_t *gk = got.key_codes(p, h) + slot * kcb,
                              *ck = cpu.store.key_codes(p, h) + slot * kcb;
                for (int st = 0; st < s.stages; ++st)
                    for (int j = 0; j < s.d; ++j, ++coords) {
                        const std::size_t off = st * packed_bytes(s.d, s.bits);
                        mismatches +=
                            read_packed(gk + off, j, s.bits) != read_packed(ck + off, j, s.bits);
                    }
                const uint8_t *gv = got.value_codes(p, h) + slot * vcb,
                              *cv = cpu.store.value_codes(p, h) + slot * vcb;
                const int vbits = s.value_bits == 16 ? 16 : s.value_bits;
                for (int j = 0; j < s.d; ++j, ++coords) {
                    const uint32_t a = vbits == 16 ? reinterpret_cast<const uint16_t*>(gv)[j]
                                                   : read_packed(gv, j, vbits);
                    const uint32_t b = vbits == 16 ? reinterpret_cast<const uint16_t*>(cv)[j]
                                                   : read_packed(cv, j, vbits);
                    mismatches += a != b;
                }
                const float gn = got.key_scalars(p, h)[slot],
                            cn = cpu.store.key_scalars(p, h)[slot];
                scalar_mismatches += std::fabs(gn - cn) > 1e-6f * std::fabs(cn);
                if (s.value_bits != 16) {
                    const float gs = got.value_scalars(p, h)[slot],
                                cs = cpu.store.value_scalars(p, h)[slot];
                    scalar_mismatches += std::fabs(gs - cs) > 1e-6f * std::fabs(cs);
                }
            }
        }
        EXPECT_LE(mismatches, coords / 1000) << mismatches << " of " << coords << " indices differ";
        EXPECT_LE(scalar_mismatches, cpu.size * s.heads / 1000)
            << scalar_mismatches << " norms/scales differ";
    }
}

TEST(CudaParity, DequantizeMatchesCpu) {
    SKIP_WITHOUT_DEVICE();
    uint64_t seed = 101;
    for (const Shape& s : kShapes) {
        SCOPED_TRACE(name(s));
        const KVCacheConfig c = make_config(s, seed);
        CudaTurboQuantCache gpu(c, s.heads, s.d, 4096);
        CpuReference cpu(c, s.heads, s.d, gpu.page_layout());
        const int n = 200;
        cpu.append(random_tokens(s.heads, n, s.d, ++seed, 1.5f),
                   random_tokens(s.heads, n, s.d, ++seed, 1.5f), n);
        gpu.upload(cpu.store, n);
        const int start = 45, m = 140;
        DeviceBuffer<float> dk(static_cast<std::size_t>(s.heads) * m * s.d),
            dv(dk.download().size());
        gpu.dequantize(start, m, dk.get(), dv.get(), nullptr);
        const auto gk = dk.download(), gv = dv.download();
        std::vector<float> rk(gk.size()), rv(gv.size());
        for (int h = 0; h < s.heads; ++h)
            for (int t = start; t < start + m; ++t) {
                const int p = t / kTokensPerPage, slot = t % kTokensPerPage;
                const std::size_t dst = (static_cast<std::size_t>(h) * m + (t - start)) * s.d;
                cpu.keys[h]->decode(cpu.store.key_codes(p, h) + slot * cpu.keys[h]->code_bytes(),
                                    cpu.store.key_scalars(p, h) + slot, kTokensPerPage, 1,
                                    &rk[dst]);
                cpu.values[h]->decode(
                    cpu.store.value_codes(p, h) + slot * cpu.values[h]->code_bytes(),
                    cpu.store.value_scalars(p, h) + slot, kTokensPerPage, 1, &rv[dst]);
            }
        EXPECT_LE(relative_error(gk, rk), 1e-5);
        EXPECT_LE(relative_error(gv, rv), 1e-5);
    }
}

TEST(CudaParity, DecodeAttentionMatchesCpuOnSameCodes) {
    SKIP_WITHOUT_DEVICE();
    uint64_t seed = 1001;
    for (const Shape& s : kShapes) {
        for (int group : {1, 4, 8}) {
            for (int n : {1, 50, 64, 300, 2000}) {
                SCOPED_TRACE(name(s) + " group " + std::to_string(group) + " n " +
                             std::to_string(n));
                const KVCacheConfig c = make_config(s, seed);
                CudaTurboQuantCache gpu(c, s.heads, s.d, 4096);
                CpuReference cpu(c, s.heads, s.d, gpu.page_layout());
                cpu.append(random_tokens(s.heads, n, s.d, ++seed, 0.3f),
                           vqtest::randn(static_cast<std::size_t>(s.heads) * n * s.d, ++seed), n);
                gpu.upload(cpu.store, n);
                const int hq = s.heads * group;
                const auto q = vqtest::randn(static_cast<std::size_t>(hq) * s.d, ++seed);
                const float scale = 1.0f / std::sqrt(static_cast<float>(s.d));
                DeviceBuffer<float> dq(q), dout(q.size());
                check_cuda(cudaMemset(dout.get(), 0xff, q.size() * sizeof(float)),
                           "poison");  // NaN
                gpu.attend(dq.get(), hq, dout.get(), scale, nullptr);
                EXPECT_LE(relative_error(dout.download(), cpu.attend(q, hq, scale)), 1e-3);
            }
        }
    }
}

TEST(CudaParity, BatchedDecodeWithShuffledPageTable) {
    SKIP_WITHOUT_DEVICE();
    const Shape s{128, 2, 1, 2, 4};
    const int group = 4, hq = s.heads * group;
    const std::vector<int> lens = {700, 130, 1, 2048};
    const KVCacheConfig c = make_config(s, 7);
    const TqHostTables host = make_host_tables(c, s.heads, s.d, 0);
    const DeviceTables tables(host);
    const int stride = 2048 / kTokensPerPage;
    std::vector<int32_t> table(lens.size() * stride);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(3));
    DeviceBuffer<uint8_t> pool(table.size() * host.layout.page_bytes);
    std::vector<std::vector<float>> refs;
    std::vector<float> queries;
    for (std::size_t b = 0; b < lens.size(); ++b) {
        CpuReference cpu(c, s.heads, s.d, host.page_layout);
        cpu.append(random_tokens(s.heads, lens[b], s.d, 50 + b, 0.3f),
                   vqtest::randn(static_cast<std::size_t>(s.heads) * lens[b] * s.d, 60 + b),
                   lens[b]);
        for (int p = 0; p < (lens[b] + kTokensPerPage - 1) / kTokensPerPage; ++p)
            check_cuda(
                cudaMemcpy(pool.get() + static_cast<std::size_t>(table[b * stride + p]) *
                                            host.layout.page_bytes,
                           cpu.store.page_data(p), host.layout.page_bytes, cudaMemcpyHostToDevice),
                "page");
        const auto q = vqtest::randn(static_cast<std::size_t>(hq) * s.d, 70 + b);
        queries.insert(queries.end(), q.begin(), q.end());
        refs.push_back(cpu.attend(q, hq, 0.125f));
    }
    DeviceBuffer<int32_t> dtable(table), dlens(std::vector<int32_t>(lens.begin(), lens.end()));
    DeviceBuffer<float> dq(queries), dout(queries.size());
    DecodeArgs a;
    a.layout = host.layout;
    a.tables = tables.get();
    a.pool = pool.get();
    a.page_table = dtable.get();
    a.page_table_stride = stride;
    a.seq_lens = dlens.get();
    a.max_seq_len = 2048;
    a.batch = static_cast<int>(lens.size());
    a.group = group;
    a.queries = dq.get();
    a.out = dout.get();
    a.scale = 0.125f;
    const int pages = 2048 / kTokensPerPage;
    // The plan's split, then forced ones: one CTA per sequence and KV head, an uneven split
    // (32 pages in 5 of 7 or 6 pages), one page per CTA, more splits than pages; and head splits
    // with tail splits (split_pages, tail_pages): 4 x 7 then 2 x 2, 6 x 5 then 1 x 2, 3 x 10 then
    // 1 x 2 (a tail of 9 clipped to the 2 pages left).
    struct Forced {
        int splits, split_pages, tail_pages, planned;
    };
    for (const Forced f : std::vector<Forced>{{0, 0, 0, 0},
                                              {1, 0, 0, 1},
                                              {5, 0, 0, 5},
                                              {pages, 0, 0, pages},
                                              {10 * pages, 0, 0, pages},
                                              {0, 7, 2, 6},
                                              {0, 5, 0, 7},
                                              {0, 10, 9, 4}}) {
        SCOPED_TRACE("splits " + std::to_string(f.splits) + ", split_pages " +
                     std::to_string(f.split_pages) + ", tail_pages " +
                     std::to_string(f.tail_pages));
        a.splits = f.splits, a.split_pages = f.split_pages, a.tail_pages = f.tail_pages;
        const int planned = decode_splits(a);
        if (f.planned == 0)
            EXPECT_GE(planned, 1);
        else
            EXPECT_EQ(planned, f.planned);
        DeviceBuffer<uint8_t> workspace(decode_workspace_bytes(a));
        a.workspace = workspace.get();
        check_cuda(cudaMemset(dout.get(), 0xff, queries.size() * sizeof(float)), "poison");  // NaN
        check_cuda(launch_decode_attention(a, nullptr), "decode");
        const auto out = dout.download();
        for (std::size_t b = 0; b < lens.size(); ++b) {
            const std::vector<float> got(out.begin() + b * hq * s.d,
                                         out.begin() + (b + 1) * hq * s.d);
            EXPECT_LE(relative_error(got, refs[b]), 1e-3)
                << "sequence " << b << " of length " << lens[b];
        }
    }
    a.splits = -1, a.split_pages = 0, a.tail_pages = 0;
    EXPECT_EQ(decode_splits(a), 0);
    EXPECT_EQ(launch_decode_attention(a, nullptr), cudaErrorInvalidValue);
    a.splits = 4, a.split_pages = 8;  // two forced plans at once
    EXPECT_EQ(decode_splits(a), 0);
    EXPECT_EQ(launch_decode_attention(a, nullptr), cudaErrorInvalidValue);
}

// The plan picks how many lane copies of the 4-bit lookup tables live in shared memory, and
// how many pages per warp (one-page rings refill in halves), by residency, and at 4-bit values
// with 4-bit keys or two 2-bit key stages, or at 2-bit values with 1-bit keys, the value table in
// rows mixed with the page rings; every choice must give the same attention.
// Two sequences, one ending mid-page.
TEST(CudaParity, DecodeWithEachTableCopyCountAndRing) {
    SKIP_WITHOUT_DEVICE();
    const std::vector<Shape> shapes = {{128, 4, 1, 4, 2}, {64, 4, 1, 4, 2}, {128, 2, 2, 4, 2},
                                       {64, 2, 2, 4, 2},  {64, 4, 2, 2, 2}, {128, 4, 3, 16, 1},
                                       {128, 1, 1, 2, 2}, {64, 1, 1, 2, 2}};
    const std::vector<int> lens = {1000, 301, 640};  // short last pages, and whole ones
    uint64_t seed = 4242;
    int deep_rings = 0;  // launches with a forced ring of 2 or 4 pages per warp
    for (const Shape& s : shapes) {
        for (int group : {1, 4, 8}) {
            const KVCacheConfig c = make_config(s, ++seed);
            const TqHostTables host = make_host_tables(c, s.heads, s.d, 0);
            const DeviceTables tables(host);
            const int hq = s.heads * group, stride = 1024 / kTokensPerPage;
            std::vector<int32_t> table(lens.size() * stride);
            std::iota(table.begin(), table.end(), 0);
            std::shuffle(table.begin(), table.end(), std::mt19937(static_cast<unsigned>(seed)));
            DeviceBuffer<uint8_t> pool(table.size() * host.layout.page_bytes);
            std::vector<float> queries, ref;
            for (std::size_t b = 0; b < lens.size(); ++b) {
                CpuReference cpu(c, s.heads, s.d, host.page_layout);
                cpu.append(random_tokens(s.heads, lens[b], s.d, ++seed, 0.3f),
                           vqtest::randn(static_cast<std::size_t>(s.heads) * lens[b] * s.d, ++seed),
                           lens[b]);
                for (int p = 0; p < (lens[b] + kTokensPerPage - 1) / kTokensPerPage; ++p)
                    check_cuda(
                        cudaMemcpy(pool.get() + static_cast<std::size_t>(table[b * stride + p]) *
                                                    host.layout.page_bytes,
                                   cpu.store.page_data(p), host.layout.page_bytes,
                                   cudaMemcpyHostToDevice),
                        "page");
                const auto q = vqtest::randn(static_cast<std::size_t>(hq) * s.d, ++seed);
                const auto r = cpu.attend(q, hq, 0.1f);
                queries.insert(queries.end(), q.begin(), q.end());
                ref.insert(ref.end(), r.begin(), r.end());
            }
            DeviceBuffer<int32_t> dtable(table),
                dlens(std::vector<int32_t>(lens.begin(), lens.end()));
            DeviceBuffer<float> dq(queries), dout(queries.size());
            DecodeArgs a;
            a.layout = host.layout;
            a.tables = tables.get();
            a.pool = pool.get();
            a.page_table = dtable.get();
            a.page_table_stride = stride;
            a.seq_lens = dlens.get();
            a.max_seq_len = 1024;
            a.batch = static_cast<int>(lens.size());
            a.group = group;
            a.queries = dq.get();
            a.out = dout.get();
            a.scale = 0.1f;
            // The plan's kernel also under each L2 policy of its page copies (0: the plan's,
            // 1 normal, 2 evict-first), which must not change a bit of the output.
            std::vector<std::vector<float>> by_eviction;
            for (int ring : {0, 1, 2, 4}) {  // 0: the plan's; deeper rings refill whole pages
                for (int copies : {0, 1, 16, 32}) {  // 0: the plan's (mixed rows where they fit)
                    for (int eviction : {0, 1, 2}) {
                        if (eviction != 0 && (ring != 0 || copies != 0)) continue;
                        SCOPED_TRACE(name(s) + " group " + std::to_string(group) + " copies " +
                                     std::to_string(copies) + " ring " + std::to_string(ring) +
                                     " page_eviction " + std::to_string(eviction));
                        a.table_copies = copies, a.ring = ring, a.page_eviction = eviction;
                        const std::size_t need = decode_workspace_bytes(a);
                        if (need == 0) {  // only when the tables and ring do not fit in shared
                            EXPECT_TRUE((s.stages == 3 && copies == 32) || ring > 1);  // memory
                            continue;
                        }
                        deep_rings += ring > 1;
                        DeviceBuffer<uint8_t> workspace(need);
                        a.workspace = workspace.get();
                        check_cuda(cudaMemset(dout.get(), 0xff, queries.size() * sizeof(float)),
                                   "poison");  // NaN
                        check_cuda(launch_decode_attention(a, nullptr), "decode");
                        const auto out = dout.download();
                        EXPECT_LE(relative_error(out, ref), 1e-3);
                        if (ring == 0 && copies == 0) by_eviction.push_back(out);
                    }
                }
            }
            ASSERT_EQ(by_eviction.size(), 3u);
            EXPECT_EQ(by_eviction[1], by_eviction[0]);
            EXPECT_EQ(by_eviction[2], by_eviction[0]);
            a.page_eviction = 0;
            a.table_copies = 3, a.ring = 0;
            EXPECT_EQ(launch_decode_attention(a, nullptr), cudaErrorInvalidValue);
            a.table_copies = 0, a.ring = 5;
            EXPECT_EQ(launch_decode_attention(a, nullptr), cudaErrorInvalidValue);
            for (int eviction : {-1, 3}) {
                a.ring = 0, a.page_eviction = eviction;
                EXPECT_EQ(decode_workspace_bytes(a), 0u) << "page_eviction " << eviction;
                EXPECT_EQ(launch_decode_attention(a, nullptr), cudaErrorInvalidValue);
            }
            a.page_eviction = 0;
        }
    }
    EXPECT_GT(deep_rings, 0);
}

TEST(CudaParity, DeviceCacheMatchesCpuCacheEndToEnd) {
    SKIP_WITHOUT_DEVICE();
    uint64_t seed = 5001;
    for (const Shape& s : {kShapes[0], kShapes[4], kShapes[6]}) {
        SCOPED_TRACE(name(s));
        const KVCacheConfig c = make_config(s, seed);
        TurboQuantRVQKVCache cpu(c, s.heads, s.d, 4096);
        CudaTurboQuantCache gpu(c, s.heads, s.d, 4096);
        int n_total = 0;
        for (int n : {500, 77, 1}) {
            const auto k = random_tokens(s.heads, n, s.d, ++seed, 1.0f),
                       v = random_tokens(s.heads, n, s.d, ++seed, 1.0f);
            DeviceBuffer<float> dk(k), dv(v);
            cpu.append(k.data(), v.data(), n);
            gpu.append(dk.get(), dv.get(), n, nullptr);
            n_total += n;
            const int hq = 4 * s.heads;
            const auto q = vqtest::randn(static_cast<std::size_t>(hq) * s.d, ++seed, 0.05f);
            std::vector<float> ref(q.size());
            cpu.attend(q.data(), hq, 1, ref.data(), 0.1f, true);
            DeviceBuffer<float> dq(q), dout(q.size());
            gpu.attend(dq.get(), hq, dout.get(), 0.1f, nullptr);
            EXPECT_LE(relative_error(dout.download(), ref), 1e-3)
                << "after " << n_total << " tokens";
        }
        // Dequantize: every token identical up to exact ties (at most 0.1% of tokens).
        const std::size_t count = static_cast<std::size_t>(s.heads) * n_total * s.d;
        std::vector<float> rk(count), rv(count);
        cpu.dequantize(0, n_total, rk.data(), rv.data());
        DeviceBuffer<float> dk(count), dv(count);
        gpu.dequantize(0, n_total, dk.get(), dv.get(), nullptr);
        const auto gk = dk.download(), gv = dv.download();
        int bad = 0;
        for (std::size_t row = 0; row < count / s.d; ++row) {
            const std::vector<float> a(gk.begin() + row * s.d, gk.begin() + (row + 1) * s.d),
                b(rk.begin() + row * s.d, rk.begin() + (row + 1) * s.d),
                x(gv.begin() + row * s.d, gv.begin() + (row + 1) * s.d),
                y(rv.begin() + row * s.d, rv.begin() + (row + 1) * s.d);
            bad += relative_error(a, b) > 1e-5 || relative_error(x, y) > 1e-5;
        }
        EXPECT_LE(bad, static_cast<int>(count / s.d / 1000)) << bad << " tokens differ";
        EXPECT_GT(gpu.nbytes(), static_cast<std::size_t>(n_total) * s.heads * (s.d / 8));
        DeviceBuffer<float> one(static_cast<std::size_t>(s.heads) * s.d);
        EXPECT_THROW(gpu.append(one.get(), one.get(), 4096, nullptr), std::length_error);
    }
}

}  // namespace
}  // namespace veloxquant::cuda
