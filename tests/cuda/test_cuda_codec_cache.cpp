// The generic device cache (CudaCodecCache) against the CPU cache of the same config, for every
// method: the pages are byte-identical (codes and scalars; methods whose encoders use
// transcendental functions may differ in a few cells), dequantize agrees to 1e-5, decode and
// causal-prefill attention on the codes agree to 1e-3 relative error, and the pages go to a CPU
// cache and through a saved file back to the device. Skips without a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cache/paged_store.h"
#include "calibration/calibrate.h"
#include "calibration/commvq_calibration.h"
#include "calibration_test_helpers.h"
#include "cuda/codec_batch.h"
#include "cuda/codec_cache.h"
#include "cuda/cuda_cache.h"
#include "cuda_test_helpers.h"
#include "veloxquant/caches.h"
#include "veloxquant/calibration.h"
#include "veloxquant/factory.h"

namespace veloxquant::cuda {
namespace {

using vqtest::calibrated;
using vqtest::DeviceBuffer;
using vqtest::method_config;
using vqtest::random_tokens;
using vqtest::relative_error;

struct Case {
    std::string name;
    KVCacheConfig config;
    int heads, d;
    /// Encoders that call atan2/hypot (polarquant) may round differently on the device.
    double max_cell_mismatch = 0.0;
    /// Query heads per KV head: decode steps run 1, 4 (up to 4 rows) or 8 rows per CTA.
    int group = 4;
};

// commvq with group_dim 2 * group_pairs and 16 codewords a stage, its codebook fitted here per
// head (calibration fits group_dim 8): the bulk key encoder's path for other group_dims
// (residual rows in shared memory).
KVCacheConfig commvq_fitted(KVCacheConfig c, int heads, int d, int group_pairs) {
    CommVQFitOptions o;
    o.codewords = 16;
    o.group_pairs = group_pairs;
    o.init_iterations = 2;
    o.em_sweeps = 1;
    const int n = 4 * o.codewords + 64;
    for (int h = 0; h < heads; ++h) {
        const auto train = vqtest::randn(static_cast<std::size_t>(n) * d, c.seed + 40 + h);
        const CommVQHeadFit fit = fit_commvq_head(train.data(), n, d, c.bits, 5 + h, o);
        c.codebook.shape = {1, heads, fit.stages, fit.groups, fit.codewords, fit.group_dim};
        c.codebook.data.insert(c.codebook.data.end(), fit.codebook.begin(), fit.codebook.end());
    }
    return c;
}

std::vector<Case> cases() {
    std::vector<Case> v;
    KVCacheConfig c = method_config("turboquant_rvq", 2, 4, 1);
    c.num_residuals = 2;
    v.push_back({"tq_d128_k2x2_v4", c, 2, 128});
    c = method_config("turboquant_rvq", 3, 2, 2);
    c.use_hadamard = false;
    v.push_back({"tq_d96_dense_k3_v2_mha", c, 2, 96, 0.0, 1});
    v.push_back({"tq_d64_k1_v16_group2", method_config("turboquant_rvq", 1, 16, 3), 3, 64, 0.0, 2});
    v.push_back({"tq_d256_k4_v8", method_config("turboquant_rvq", 4, 8, 4), 1, 256});
    c = method_config("ratequant", 3, 4, 5);
    c.bit_allocation = {{"0.0", 2}, {"0.1", 4}};
    v.push_back({"ratequant_per_head", c, 3, 128});
    v.push_back({"fp16_d128_group8", method_config("fp16", 4, 16, 6), 2, 128, 0.0, 8});
    v.push_back({"fp16_d96_mha", method_config("fp16", 4, 16, 13), 3, 96, 0.0, 1});
    c = method_config("qjl", 1, 2, 7);
    c.sketch_dim = 256;
    v.push_back({"qjl_d128_m256_v2_mha", c, 2, 128, 0.0, 1});
    v.push_back({"polarquant_d64_b2_v4", method_config("polarquant", 2, 4, 8), 2, 64, 1e-3});
    c = method_config("rabitq", 2, 4, 11);
    c.num_clusters = 32;
    v.push_back({"rabitq_d128_b2_trained_on_prefill", c, 2, 128});
    c = method_config("rabitq", 3, 4, 16);
    c.num_clusters = 3;  // trains on 96 of a 150-token prefill: the device copies only those
    v.push_back({"rabitq_d64_b3_trained_on_a_subsample", c, 2, 64});
    c = method_config("rabitq", 4, 4, 17);
    c.num_clusters = 64;  // 896 critical values a token, the centroids staged for the warps
    v.push_back({"rabitq_d128_b4_c64", c, 2, 128});
    c = method_config("rabitq", 3, 2, 18);
    c.num_clusters = 300;  // two id bytes; 150 centroids do not fit beside the warps' memory
    v.push_back({"rabitq_d256_b3_two_byte_ids", c, 1, 256});
    c = method_config("rabitq", 3, 4, 19);
    c.num_clusters = 16;  // a dense rotation (d = 96): the warp encoder refuses it, so every
    v.push_back({"rabitq_d96_b3_dense", c, 2, 96});  // append takes the team and one-thread ones
    c = method_config("spectral", 4, 4, 10);
    v.push_back({"spectral_d128", calibrated(c, 2, 128), 2, 128});
    c = method_config("commvq", 2, 4, 12);
    v.push_back({"commvq_d64_b2", calibrated(c, 2, 64), 2, 64, 1e-3});
    // Three stages of 256 codewords: more slices than the tensor search keeps staged for a
    // group (cvq_tensor_layout), so one is staged a step.
    c = method_config("commvq", 3, 4, 22);
    v.push_back({"commvq_d64_b3", calibrated(c, 2, 64), 2, 64, 1e-3});
    v.push_back({"vecinfer_d64_b2", calibrated(method_config("vecinfer", 2, 4, 9), 2, 64), 2, 64});
    v.push_back({"commvq_d64_b2_group_dim4",
                 commvq_fitted(method_config("commvq", 2, 4, 21), 2, 64, 2), 2, 64, 1e-3});
    // Widths off the tensor-core paths' grid: keys scored lane by lane (d % 16 != 0), value
    // rows that are not whole words (field-by-field tile decode), fp16 values of odd width,
    // and a sketch whose feature tile does not fit beside the staged codes.
    c = method_config("turboquant_rvq", 2, 2, 17);
    c.use_hadamard = false;
    v.push_back({"tq_d72_dense_k2_v2", c, 2, 72});
    v.push_back({"fp16_d63_v16_mha", method_config("fp16", 4, 16, 18), 2, 63, 0.0, 1});
    c = method_config("qjl", 1, 4, 19);
    c.sketch_dim = 4352;  // 544 code bytes
    v.push_back({"qjl_d64_m4352_v4", c, 2, 64});
    // Under a warp: half the lanes of the warp value encoder idle; 3-bit value fields across
    // words; a sketch of 100 rows (a partial row tile and a partial last code byte).
    c = method_config("qjl", 1, 3, 20);
    c.sketch_dim = 100;
    v.push_back({"qjl_d16_m100_v3", c, 2, 16});
    return v;
}

class CodecCacheParity : public testing::TestWithParam<Case> {};

TEST_P(CodecCacheParity, MatchesCpuCache) {
    SKIP_WITHOUT_DEVICE();
    const Case& k = GetParam();
    const int H = k.heads, d = k.d, group = k.group, hq = H * group;
    auto cpu_owner = KVCacheFactory::create(k.config, H, d, 4096);
    auto* cpu = dynamic_cast<QuantizedKVCache*>(cpu_owner.get());
    ASSERT_NE(cpu, nullptr);
    CudaCodecCache gpu(k.config, H, d, 4096);
    uint64_t seed = 100;
    int total = 0;
    // A prefill chunk (causal attention of its own queries), a second chunk across a page
    // boundary, then decode steps.
    for (const int n : {150, 70, 1, 1}) {
        const auto keys = random_tokens(H, n, d, ++seed, 0.5f);
        const auto values = random_tokens(H, n, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        cpu->append(keys.data(), values.data(), n);
        gpu.append(dk.get(), dv.get(), n, nullptr);
        total += n;
        const auto q = vqtest::randn(static_cast<std::size_t>(hq) * n * d, ++seed, 0.1f);
        std::vector<float> ref(q.size());
        cpu->attend(q.data(), hq, n, ref.data(), 0.125f, true);
        DeviceBuffer<float> dq(q), dout(q.size());
        gpu.attend(dq.get(), hq, n, dout.get(), 0.125f, true, nullptr);
        EXPECT_LE(relative_error(dout.download(), ref), 1e-3) << "causal, after " << total;
    }
    // Non-causal attention of two queries per head over everything.
    const auto q = vqtest::randn(static_cast<std::size_t>(hq) * 2 * d, ++seed, 0.1f);
    std::vector<float> ref(q.size());
    cpu->attend(q.data(), hq, 2, ref.data(), 0.125f, false);
    DeviceBuffer<float> dq(q), dout(q.size());
    gpu.attend(dq.get(), hq, 2, dout.get(), 0.125f, false, nullptr);
    EXPECT_LE(relative_error(dout.download(), ref), 1e-3) << "non-causal";

    // Pages: byte for byte, or nearly so for transcendental encoders.
    PagedStore pages(gpu.page_layout());
    gpu.download(pages);
    const PagedStore& ref_pages = cpu->paged_store();
    ASSERT_EQ(pages.layout().page_bytes, ref_pages.layout().page_bytes);
    std::size_t diff = 0, bytes = 0;
    for (int p = 0; p * kTokensPerPage < total; ++p) {
        const uint8_t* a = pages.page_data(p);
        const uint8_t* b = ref_pages.page_data(p);
        for (std::size_t i = 0; i < pages.layout().page_bytes; ++i) diff += a[i] != b[i];
        bytes += pages.layout().page_bytes;
    }
    EXPECT_LE(static_cast<double>(diff), k.max_cell_mismatch * bytes) << diff << " bytes differ";

    // Dequantize.
    const std::size_t count = static_cast<std::size_t>(H) * total * d;
    std::vector<float> rk(count), rv(count);
    cpu->dequantize(0, total, rk.data(), rv.data());
    DeviceBuffer<float> gk(count), gv(count);
    gpu.dequantize(0, total, gk.get(), gv.get(), nullptr);
    const double tol = k.max_cell_mismatch > 0 ? 1e-3 : 1e-5;
    EXPECT_LE(relative_error(gk.download(), rk), tol);
    EXPECT_LE(relative_error(gv.download(), rv), tol);

    // Through the host: to_host() is a CPU cache of these pages; a saved file loads back onto
    // the device with the same codes (and rabitq's trained centroids).
    const auto host = gpu.to_host();
    EXPECT_EQ(host->size(), total);
    std::vector<float> via_host(q.size());
    host->attend(q.data(), hq, 2, via_host.data(), 0.125f, false);
    EXPECT_LE(relative_error(via_host, ref), 1e-3) << "to_host";
    const std::string path = vqtest::unique_temp_path("gpu.vqc");
    gpu.save(path);
    const auto back = CudaCodecCache::load(path);
    std::remove(path.c_str());
    ASSERT_EQ(back->size(), total);
    DeviceBuffer<float> dback(q.size());
    back->attend(dq.get(), hq, 2, dback.get(), 0.125f, false, nullptr);
    EXPECT_LE(relative_error(dback.download(), dout.download()), 1e-6) << "save / load";

    // Capacity and truncation behave as the CPU cache's.
    DeviceBuffer<float> one(static_cast<std::size_t>(H) * 4096 * d);
    EXPECT_THROW(gpu.append(one.get(), one.get(), 4096, nullptr), std::length_error);
    EXPECT_EQ(gpu.size(), total);
    gpu.truncate(100);
    cpu->trim(total - 100);
    const auto q1 = vqtest::randn(static_cast<std::size_t>(hq) * d, ++seed, 0.1f);
    std::vector<float> r1(q1.size());
    cpu->attend(q1.data(), hq, 1, r1.data(), 0.125f, true);
    DeviceBuffer<float> dq1(q1), do1(q1.size());
    gpu.attend(dq1.get(), hq, 1, do1.get(), 0.125f, true, nullptr);
    EXPECT_LE(relative_error(do1.download(), r1), 1e-3) << "after truncate";
}

// Long chunks take the wide prefill kernel (64 rows a CTA: codec_prefill.cuh) where the key codec
// has the feature form and head_dim <= 128: a chunk of 130 queries over 1100 tokens (several
// splits, a chunk that starts and ends mid-page), causal and not, with queries of unit scale so
// that the softmax is far from uniform.
TEST_P(CodecCacheParity, LongChunksMatchTheCpu) {
    SKIP_WITHOUT_DEVICE();
    const Case& k = GetParam();
    const int H = k.heads, d = k.d, hq = H * k.group;
    auto cpu = KVCacheFactory::create(k.config, H, d, 2048);
    CudaCodecCache gpu(k.config, H, d, 2048);
    uint64_t seed = 700;
    for (const int n : {970, 130}) {
        const auto keys = random_tokens(H, n, d, ++seed, 0.5f);
        const auto values = random_tokens(H, n, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        cpu->append(keys.data(), values.data(), n);
        gpu.append(dk.get(), dv.get(), n, nullptr);
    }
    for (const auto [n, causal] : {std::pair{130, true}, std::pair{64, false}}) {
        const auto q = vqtest::randn(static_cast<std::size_t>(hq) * n * d, ++seed, 1.0f);
        std::vector<float> ref(q.size());
        cpu->attend(q.data(), hq, n, ref.data(), 0.125f, causal);
        DeviceBuffer<float> dq(q), dout(q.size());
        gpu.attend(dq.get(), hq, n, dout.get(), 0.125f, causal, nullptr);
        EXPECT_LE(relative_error(dout.download(), ref), 1e-3) << n << " queries, causal " << causal;
    }
}

// The driver reserves a launched kernel's stack beyond its default 1 KB for every thread the GPU
// can hold (264 MiB a KB on an H200) and keeps it, so the encoders keep theirs near 1 KB (run 82:
// 264-594 MiB held before; spectral's 2 KB of projections in doubles held 404 MiB until they
// became floats).
TEST_P(CodecCacheParity, EncodersKeepTheirStacksSmall) {
    SKIP_WITHOUT_DEVICE();
    const Case& k = GetParam();
    CudaCodecCache gpu(k.config, k.heads, k.d, 4096);
    const int n = 150;  // a prefill: rabitq trains its codecs (and has kernels) on it
    DeviceBuffer<float> keys(random_tokens(k.heads, n, k.d, 3, 0.5f));
    DeviceBuffer<float> values(random_tokens(k.heads, n, k.d, 4, 0.5f));
    gpu.append(keys.get(), values.get(), n, nullptr);
    EXPECT_LE(gpu.encode_stack_bytes(), 1152u) << k.config.method;
}

// A batch's decode steps through CudaCodecBatch (one check, one launch of each kernel) against
// each sequence's cache alone (1e-5) and the CPU cache (1e-3), sequences of different lengths.
// A codec trained on each sequence's own tokens (rabitq here: 32 centroids on the longer
// prefills, 17 on the shortest) batches too, each sequence read with its own centroids.
TEST_P(CodecCacheParity, BatchedDecodeStepsMatchEachCache) {
    SKIP_WITHOUT_DEVICE();
    const Case& k = GetParam();
    const int H = k.heads, d = k.d, group = k.group, hq = H * group;
    const std::vector<int> prefill = {200, 70, 17};
    const int batch = static_cast<int>(prefill.size());
    std::vector<std::unique_ptr<KVCache>> cpu;
    std::vector<std::unique_ptr<CudaCodecCache>> solo, joint;
    uint64_t seed = 700;
    for (int b = 0; b < batch; ++b) {
        cpu.push_back(KVCacheFactory::create(k.config, H, d, 4096, 0));
        solo.push_back(std::make_unique<CudaCodecCache>(k.config, H, d, 4096, 0));
        joint.push_back(std::make_unique<CudaCodecCache>(k.config, H, d, 4096, 0));
        const auto keys = random_tokens(H, prefill[b], d, ++seed, 0.5f);
        const auto values = random_tokens(H, prefill[b], d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        cpu[b]->append(keys.data(), values.data(), prefill[b]);
        solo[b]->append(dk.get(), dv.get(), prefill[b], nullptr);
        joint[b]->append(dk.get(), dv.get(), prefill[b], nullptr);
    }
    std::vector<CudaCodecCache*> rows;
    for (auto& j : joint) rows.push_back(j.get());
    EXPECT_TRUE(CudaCodecBatch::alike({rows.begin(), rows.end()}));
    CudaCodecBatch step;
    const std::size_t per_token = static_cast<std::size_t>(H) * d;
    const std::size_t per_query = static_cast<std::size_t>(hq) * d;
    for (int t = 0; t < 2; ++t) {
        const auto keys = random_tokens(batch * H, 1, d, ++seed, 0.5f);
        const auto values = random_tokens(batch * H, 1, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        step.append(rows, dk.get(), dv.get(), 1, nullptr);
        for (int b = 0; b < batch; ++b) {
            cpu[b]->append(keys.data() + b * per_token, values.data() + b * per_token, 1);
            solo[b]->append(dk.get() + b * per_token, dv.get() + b * per_token, 1, nullptr);
            ASSERT_EQ(joint[b]->size(), prefill[b] + t + 1);
        }
        const auto q = vqtest::randn(batch * per_query, ++seed, 0.1f);
        DeviceBuffer<float> dq(q), dout(q.size()), dsolo(per_query);
        check_cuda(cudaMemset(dout.get(), 0xff, q.size() * sizeof(float)), "poison");  // NaN
        step.attend(rows, dq.get(), hq, dout.get(), 0.125f, nullptr);
        const auto got = dout.download();
        for (int b = 0; b < batch; ++b) {
            SCOPED_TRACE("step " + std::to_string(t) + " sequence " + std::to_string(b));
            const std::vector<float> mine(got.begin() + b * per_query,
                                          got.begin() + (b + 1) * per_query);
            solo[b]->attend(dq.get() + b * per_query, hq, 1, dsolo.get(), 0.125f, false, nullptr);
            std::vector<float> ref(per_query);
            cpu[b]->attend(q.data() + b * per_query, hq, 1, ref.data(), 0.125f, false);
            EXPECT_LE(relative_error(mine, dsolo.download()), 1e-5);
            EXPECT_LE(relative_error(mine, ref), 1e-3);
        }
    }
    KVCacheConfig reseeded = k.config;  // another config: other rotations and sketches
    ++reseeded.seed;
    CudaCodecCache other(reseeded, H, d, 4096, 0);
    const auto one = random_tokens(H, 1, d, ++seed, 0.5f);
    DeviceBuffer<float> done(one);
    other.append(done.get(), done.get(), 1, nullptr);  // trained, where it trains
    EXPECT_FALSE(CudaCodecBatch::alike({rows[0], rows[1], &other}));
    for (int b = 0; b < batch; ++b) {  // the batch stored what each cache alone stored
        PagedStore a(joint[b]->page_layout()), c(solo[b]->page_layout());
        joint[b]->download(a);
        solo[b]->download(c);
        for (int p = 0; p < (joint[b]->size() + kTokensPerPage - 1) / kTokensPerPage; ++p)
            EXPECT_EQ(std::memcmp(a.page_data(p), c.page_data(p), a.layout().page_bytes), 0);
    }
}

// A long append through CudaCodecBatch (one launch per kernel for every sequence, each from its
// own position; rabitq's sequences each with their own trained codecs) stores what the CPU cache
// stores for the same tokens: the long appends' kernels (the tiled qjl keys, the warp value
// encoder, the one-thread and team encoders without their values) on a batch's pools.
TEST_P(CodecCacheParity, LongBatchedAppendMatchesTheCpu) {
    SKIP_WITHOUT_DEVICE();
    const Case& k = GetParam();
    const int H = k.heads, d = k.d;
    const std::vector<int> prefill = {200, 70, 17};
    const int batch = static_cast<int>(prefill.size());
    const int n = static_cast<int>(kTeamEncodeMaxItems / (batch * H)) + 37;  // past the teams
    std::vector<std::unique_ptr<KVCache>> cpu;
    std::vector<std::unique_ptr<CudaCodecCache>> gpu;
    uint64_t seed = 1300;
    for (int b = 0; b < batch; ++b) {
        cpu.push_back(KVCacheFactory::create(k.config, H, d, 4096, 0));
        gpu.push_back(std::make_unique<CudaCodecCache>(k.config, H, d, 4096, 0));
        const auto keys = random_tokens(H, prefill[b], d, ++seed, 0.5f);
        const auto values = random_tokens(H, prefill[b], d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        cpu[b]->append(keys.data(), values.data(), prefill[b]);
        gpu[b]->append(dk.get(), dv.get(), prefill[b], nullptr);
    }
    std::vector<CudaCodecCache*> rows;
    for (auto& g : gpu) rows.push_back(g.get());
    ASSERT_TRUE(CudaCodecBatch::alike({rows.begin(), rows.end()}));
    const auto keys = random_tokens(batch * H, n, d, ++seed, 0.5f);
    const auto values = random_tokens(batch * H, n, d, ++seed, 0.5f);
    DeviceBuffer<float> dk(keys), dv(values);
    CudaCodecBatch().append(rows, dk.get(), dv.get(), n, nullptr);
    const std::size_t per_sequence = static_cast<std::size_t>(H) * n * d;
    for (int b = 0; b < batch; ++b) {
        SCOPED_TRACE("sequence " + std::to_string(b));
        cpu[b]->append(keys.data() + b * per_sequence, values.data() + b * per_sequence, n);
        ASSERT_EQ(gpu[b]->size(), prefill[b] + n);
        PagedStore mine(gpu[b]->page_layout());
        gpu[b]->download(mine);
        const PagedStore& ref = dynamic_cast<QuantizedKVCache&>(*cpu[b]).paged_store();
        std::size_t diff = 0, bytes = 0;
        for (int p = 0; p * kTokensPerPage < gpu[b]->size(); ++p) {
            for (std::size_t i = 0; i < mine.layout().page_bytes; ++i)
                diff += mine.page_data(p)[i] != ref.page_data(p)[i];
            bytes += mine.layout().page_bytes;
        }
        EXPECT_LE(static_cast<double>(diff), k.max_cell_mismatch * bytes)
            << diff << " bytes differ";
    }
}

// The team encoders of short appends (one CTA per item) store the bytes the one-thread encoders
// of long appends store: the same tokens appended in chunks small enough for the teams (a
// decode step, a few tokens, a full team launch across pages) and in one long append give
// identical pages, and both give the CPU cache's (as MatchesCpuCache). Both device caches first
// take the same short prefill, which trains rabitq alike. (fp16, turboquant and rabitq take the
// teams for long appends too.) Besides the methods above (qjl_d64_m4352_v4: 544 code bytes),
// codes past 512 bytes per token: the team encoders' shared bit streams are sized by each
// codec's limits.
std::vector<Case> team_cases() {
    std::vector<Case> v = cases();
    KVCacheConfig c = method_config("turboquant_rvq", 4, 8, 14);
    c.num_residuals = 8;  // 8 stages x 128 bytes of 4-bit indices
    v.push_back({"tq_d256_k4x8_v8_1024_code_bytes", c, 1, 256});
    return v;
}

class TeamEncodeParity : public testing::TestWithParam<Case> {};

TEST_P(TeamEncodeParity, TeamEncodesLikeOneThread) {
    SKIP_WITHOUT_DEVICE();
    const Case& k = GetParam();
    const int H = k.heads, d = k.d;
    const int team_tokens = static_cast<int>(kTeamEncodeMaxItems / H);  // largest team append
    const std::vector<int> chunks = {1, 3, 60, 1, team_tokens, 1};
    int total = 0;
    for (const int c : chunks) total += c;
    ASSERT_GT(static_cast<long long>(total) * H, kTeamEncodeMaxItems);  // one long append
    const int prefill = 100;
    CudaCodecCache teams(k.config, H, d, prefill + total), bulk(k.config, H, d, prefill + total);
    const auto pk = random_tokens(H, prefill, d, 901, 0.5f);
    const auto pv = random_tokens(H, prefill, d, 902, 0.5f);
    DeviceBuffer<float> dpk(pk), dpv(pv);
    teams.append(dpk.get(), dpv.get(), prefill, nullptr);
    bulk.append(dpk.get(), dpv.get(), prefill, nullptr);
    std::vector<float> all_k(static_cast<std::size_t>(H) * total * d), all_v(all_k.size());
    uint64_t seed = 910;
    int at = 0;
    for (const int c : chunks) {
        const auto keys = random_tokens(H, c, d, ++seed, 0.5f);
        const auto values = random_tokens(H, c, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        teams.append(dk.get(), dv.get(), c, nullptr);
        for (int h = 0; h < H; ++h) {  // [H][c][d] into [H][total][d]
            const std::size_t from = static_cast<std::size_t>(h) * c * d;
            const std::size_t to = (static_cast<std::size_t>(h) * total + at) * d;
            std::copy(keys.begin() + from, keys.begin() + from + c * d, all_k.begin() + to);
            std::copy(values.begin() + from, values.begin() + from + c * d, all_v.begin() + to);
        }
        at += c;
    }
    DeviceBuffer<float> dk(all_k), dv(all_v);
    bulk.append(dk.get(), dv.get(), total, nullptr);
    auto cpu = KVCacheFactory::create(k.config, H, d, prefill + total);
    cpu->append(pk.data(), pv.data(), prefill);
    cpu->append(all_k.data(), all_v.data(), total);
    ASSERT_EQ(teams.size(), bulk.size());
    PagedStore a(teams.page_layout()), b(bulk.page_layout());
    teams.download(a);
    bulk.download(b);
    const PagedStore& c = dynamic_cast<QuantizedKVCache&>(*cpu).paged_store();
    std::size_t cpu_diff = 0, bytes = 0;
    for (int p = 0; p < (teams.size() + kTokensPerPage - 1) / kTokensPerPage; ++p) {
        EXPECT_EQ(std::memcmp(a.page_data(p), b.page_data(p), a.layout().page_bytes), 0)
            << "page " << p;
        for (std::size_t i = 0; i < a.layout().page_bytes; ++i)
            cpu_diff += a.page_data(p)[i] != c.page_data(p)[i];
        bytes += a.layout().page_bytes;
    }
    EXPECT_LE(static_cast<double>(cpu_diff), k.max_cell_mismatch * bytes)
        << cpu_diff << " bytes differ from the CPU cache's";
}

INSTANTIATE_TEST_SUITE_P(Methods, CodecCacheParity, testing::ValuesIn(cases()),
                         [](const testing::TestParamInfo<Case>& i) { return i.param.name; });
INSTANTIATE_TEST_SUITE_P(Methods, TeamEncodeParity, testing::ValuesIn(team_cases()),
                         [](const testing::TestParamInfo<Case>& i) { return i.param.name; });

// Decode from an empty cache, one token at a time, as a transformers generation appends and
// attends: every step a decode step over 1 .. 40 tokens (short first chunks, a tile of 16 only
// partly filled), with grouped heads on the 4-row kernels (group 2) and unit-scale queries.
// The tensor-core scores (fp16, qjl) and the lane scores (turboquant) against the CPU cache.
TEST(CodecCache, DecodesTokenByTokenFromEmpty) {
    SKIP_WITHOUT_DEVICE();
    KVCacheConfig qjl = method_config("qjl", 1, 4, 3);
    qjl.sketch_dim = 128;
    KVCacheConfig tq = method_config("turboquant_rvq", 2, 4, 4);
    tq.use_hadamard = false;
    const std::vector<Case> configs = {{"qjl_d64_m128_v4", qjl, 2, 64, 0.0, 2},
                                       {"fp16_d64", method_config("fp16", 4, 16, 5), 2, 64, 0.0, 2},
                                       {"tq_d64_dense_k2_v4", tq, 2, 64, 0.0, 2},
                                       {"qjl_d128_m128_v4_group4", qjl, 2, 128, 0.0, 4}};
    for (const Case& k : configs) {
        SCOPED_TRACE(k.name);
        const int H = k.heads, d = k.d, hq = H * k.group;
        auto cpu = KVCacheFactory::create(k.config, H, d, 256);
        CudaCodecCache gpu(k.config, H, d, 256);
        uint64_t seed = 300;
        for (int t = 1; t <= 40; ++t) {
            const auto keys = random_tokens(H, 1, d, ++seed, 0.5f);
            const auto values = random_tokens(H, 1, d, ++seed, 0.5f);
            DeviceBuffer<float> dk(keys), dv(values);
            cpu->append(keys.data(), values.data(), 1);
            gpu.append(dk.get(), dv.get(), 1, nullptr);
            const auto q = vqtest::randn(static_cast<std::size_t>(hq) * d, ++seed, 1.0f);
            std::vector<float> ref(q.size());
            cpu->attend(q.data(), hq, 1, ref.data(), 0.125f, true);
            DeviceBuffer<float> dq(q), dout(q.size());
            gpu.attend(dq.get(), hq, 1, dout.get(), 0.125f, true, nullptr);
            EXPECT_LE(relative_error(dout.download(), ref), 1e-3) << "after " << t << " tokens";
        }
    }
}

// Long sequences: 8 KV heads of 20001 tokens give each warp of a split three 32-token chunks on
// the 132 SMs of an H200 (more on fewer SMs), the last one short, so the running max and sums
// are carried from chunk to chunk inside a warp, which the short caches above never do (one
// chunk a warp). A decode step (4 rows a CTA) and a causal chunk of 8 queries (8 rows), for each
// score path: lanes (turboquant, polarquant), a feature tile (qjl), features in place (fp16).
TEST(CodecCache, LongSequencesMatchTheCpu) {
    SKIP_WITHOUT_DEVICE();
    KVCacheConfig qjl = method_config("qjl", 1, 4, 21);
    qjl.sketch_dim = 256;
    const std::vector<Case> configs = {
        {"tq_d128_k4_v4", method_config("turboquant_rvq", 4, 4, 20), 8, 128},
        {"qjl_d128_m256_v4", qjl, 8, 128},
        {"fp16_d128", method_config("fp16", 4, 16, 22), 8, 128},
        {"polarquant_d64_b2_v2", method_config("polarquant", 2, 2, 23), 8, 64}};
    constexpr int kTokens = 20001;
    for (const Case& k : configs) {
        SCOPED_TRACE(k.name);
        const int H = k.heads, d = k.d, hq = H * k.group;
        auto cpu = KVCacheFactory::create(k.config, H, d, kTokens);
        CudaCodecCache gpu(k.config, H, d, kTokens);
        const auto keys = random_tokens(H, kTokens, d, 400, 0.5f);
        const auto values = random_tokens(H, kTokens, d, 401, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        cpu->append(keys.data(), values.data(), kTokens);
        gpu.append(dk.get(), dv.get(), kTokens, nullptr);
        for (const int n : {1, 8}) {
            const auto q = vqtest::randn(static_cast<std::size_t>(hq) * n * d, 402 + n, 1.0f);
            std::vector<float> ref(q.size());
            cpu->attend(q.data(), hq, n, ref.data(), 0.125f, true);
            DeviceBuffer<float> dq(q), dout(q.size());
            gpu.attend(dq.get(), hq, n, dout.get(), 0.125f, true, nullptr);
            EXPECT_LE(relative_error(dout.download(), ref), 1e-3) << n << " queries";
        }
    }
}

// A chunk whose query and partial states pass LaunchScratch::kKeptBytes (3072 non-causal queries
// of 32 query heads at d = 128: 48 MiB of partial sums at one split) takes them stream-ordered
// and gives them back: the cache holds the same bytes after it, twice over, as after a decode
// step, and its rows agree with the CPU cache's (the first 64 queries of each head: a
// non-causal row depends on its own query only).
TEST(CodecCache, LongChunksKeepNoScratch) {
    SKIP_WITHOUT_DEVICE();
    const int H = 8, d = 128, hq = 4 * H, n = 1024, chunk = 3072, checked = 64;
    const KVCacheConfig c = method_config("turboquant_rvq", 2, 4, 41);
    auto cpu = KVCacheFactory::create(c, H, d, n);
    CudaCodecCache gpu(c, H, d, n);
    const auto keys = random_tokens(H, n, d, 42, 0.5f);
    const auto values = random_tokens(H, n, d, 43, 0.5f);
    DeviceBuffer<float> dk(keys), dv(values);
    cpu->append(keys.data(), values.data(), n);
    gpu.append(dk.get(), dv.get(), n, nullptr);
    DeviceBuffer<float> step(vqtest::randn(static_cast<std::size_t>(hq) * d, 44, 1.0f));
    DeviceBuffer<float> step_out(static_cast<std::size_t>(hq) * d);
    gpu.attend(step.get(), hq, 1, step_out.get(), 0.125f, true, nullptr);
    const std::size_t held = gpu.nbytes();
    const auto q = vqtest::randn(static_cast<std::size_t>(hq) * chunk * d, 45, 1.0f);
    DeviceBuffer<float> dq(q), dout(q.size());
    for (int round = 0; round < 2; ++round) {
        gpu.attend(dq.get(), hq, chunk, dout.get(), 0.125f, false, nullptr);
        EXPECT_EQ(gpu.nbytes(), held) << "round " << round;
    }
    const auto out = dout.download();
    const std::size_t rows = static_cast<std::size_t>(checked) * d,
                      head = static_cast<std::size_t>(chunk) * d;
    std::vector<float> few, mine;
    for (int h = 0; h < hq; ++h) {
        few.insert(few.end(), q.begin() + h * head, q.begin() + h * head + rows);
        mine.insert(mine.end(), out.begin() + h * head, out.begin() + h * head + rows);
    }
    std::vector<float> ref(few.size());
    cpu->attend(few.data(), hq, checked, ref.data(), 0.125f, false);
    EXPECT_LE(relative_error(mine, ref), 1e-3);
}

// The device cache's pages, byte for byte those of the CPU cache fed the same tokens.
void expect_pages_of_the_cpu(const CudaCodecCache& gpu, const KVCache& cpu) {
    PagedStore mine(gpu.page_layout());
    gpu.download(mine);
    const PagedStore& ref = dynamic_cast<const QuantizedKVCache&>(cpu).paged_store();
    for (int p = 0; p * kTokensPerPage < gpu.size(); ++p)
        EXPECT_EQ(std::memcmp(mine.page_data(p), ref.page_data(p), mine.layout().page_bytes), 0)
            << "page " << p;
}

// Tied critical values: rabitq with one centroid trained on zero keys (c = 0 exactly), then keys
// of +-1, whose rotated coordinates are multiples of 2 / sqrt(d): many |e_j| are equal, so many
// events share t (s / |e_j| = s' / |e_j'| as well where |e_j'| = 2 |e_j|) and their order is the
// coordinate's. A long append and a short one (both the warp encoder's) against the CPU.
TEST(CodecCache, RabitqTiedCriticalValuesMatchTheCpu) {
    SKIP_WITHOUT_DEVICE();
    KVCacheConfig c = method_config("rabitq", 4, 4, 31);
    c.num_clusters = 1;
    const int H = 2, d = 128, prefill = 100, extra = 3;
    const int n = static_cast<int>(kTeamEncodeMaxItems / H) + 52;  // past the teams
    auto cpu = KVCacheFactory::create(c, H, d, prefill + n + extra);
    CudaCodecCache gpu(c, H, d, prefill + n + extra);
    const std::vector<float> zeros(static_cast<std::size_t>(H) * prefill * d, 0.0f);
    const auto values = random_tokens(H, prefill, d, 501, 0.5f);
    DeviceBuffer<float> dz(zeros), dv(values);
    cpu->append(zeros.data(), values.data(), prefill);
    gpu.append(dz.get(), dv.get(), prefill, nullptr);
    uint64_t seed = 502;
    for (const int count : {n, extra}) {
        auto keys = vqtest::randn(static_cast<std::size_t>(H) * count * d, ++seed);
        for (float& k : keys) k = k < 0.0f ? -1.0f : 1.0f;
        const auto vals = random_tokens(H, count, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dvals(vals);
        cpu->append(keys.data(), vals.data(), count);
        gpu.append(dk.get(), dvals.get(), count, nullptr);
    }
    expect_pages_of_the_cpu(gpu, *cpu);
}

// Values whose ||v||^2 leaves 1 / ||v|| undecided between two floats within the warp value
// encoder's bounds (value_encode.cuh: a tree sum's ordered_sum_bounds), so that it adds the
// terms in order as the CPU does: v = +-(1 at j0, b at j1), b picked on the host so that
// float(1 / sqrt(.)) differs at the ends of fl(1 + b^2) -+ (d + 8) 2^-51 fl(1 + b^2). A long
// append of such rows among random ones against the CPU, byte for byte.
TEST(CodecCache, ValuesAtARoundingEdgeMatchTheCpu) {
    SKIP_WITHOUT_DEVICE();
    const int H = 2, d = 128, prefill = 100;
    std::vector<float> edges;  // b with an undecided inverse norm
    for (int k = 0; edges.size() < 16 && k < 4096; ++k) {
        float b = static_cast<float>(std::sqrt((2.0 * k + 1.0) * 0x1p-24));
        for (int i = 0; i < 64; ++i) b = std::nextafter(b, 0.0f);
        for (int i = 0; i < 128 && edges.size() < 16; ++i, b = std::nextafter(b, 1.0f)) {
            const double sum = 1.0 + static_cast<double>(b) * b, slack = (d + 8) * 0x1p-51 * sum;
            if (static_cast<float>(1.0 / std::sqrt(sum - slack)) !=
                static_cast<float>(1.0 / std::sqrt(sum + slack)))
                edges.push_back(b);
        }
    }
    ASSERT_EQ(edges.size(), 16u);
    KVCacheConfig c = method_config("rabitq", 3, 4, 33);
    const int n = static_cast<int>(kTeamEncodeMaxItems / H) + 52;  // past the teams
    auto cpu = KVCacheFactory::create(c, H, d, prefill + n);
    CudaCodecCache gpu(c, H, d, prefill + n);
    const auto keys = random_tokens(H, prefill + n, d, 511, 0.5f);
    auto values = random_tokens(H, prefill + n, d, 512, 0.5f);
    for (std::size_t row = prefill; row < values.size() / d; row += 3) {  // every third row
        float* v = values.data() + row * d;
        std::fill(v, v + d, 0.0f);
        const int j0 = static_cast<int>(row * 7 % d), j1 = (j0 + 1 + static_cast<int>(row % 5)) % d;
        const float sign = row % 2 ? -1.0f : 1.0f;
        v[j0] = sign;
        v[j1] = sign * edges[row % edges.size()];
    }
    for (const auto [first, count] : {std::pair{0, prefill}, std::pair{prefill, n}}) {
        std::vector<float> k, v;
        for (int h = 0; h < H; ++h) {
            const std::size_t at = (static_cast<std::size_t>(h) * (prefill + n) + first) * d;
            k.insert(k.end(), keys.begin() + at,
                     keys.begin() + at + static_cast<std::size_t>(count) * d);
            v.insert(v.end(), values.begin() + at,
                     values.begin() + at + static_cast<std::size_t>(count) * d);
        }
        DeviceBuffer<float> dk(k), dv(v);
        cpu->append(k.data(), v.data(), count);
        gpu.append(dk.get(), dv.get(), count, nullptr);
    }
    expect_pages_of_the_cpu(gpu, *cpu);
}

}  // namespace
}  // namespace veloxquant::cuda
