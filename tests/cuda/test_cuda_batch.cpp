// CudaTurboQuantBatch against each sequence's own CudaTurboQuantCache and the CPU
// TurboQuantRVQKVCache: a batched decode step stores the codes the cache alone stores (byte for
// byte), one launch attends as each cache alone does, across a pool that grows mid-batch; batched
// prefills and steps into caches of different sizes, centred or not, store and estimate what each
// cache alone does; and bad input (NaN in one sequence, a full cache, mismatched or repeated
// caches) changes no cache. Skips cleanly without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_cache.h"
#include "cuda/turboquant_batch.h"
#include "cuda_test_helpers.h"
#include "rope_test_keys.h"
#include "test_helpers.h"
#include "veloxquant/caches.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;
using vqtest::random_tokens;
using vqtest::relative_error;

struct Shape {
    int d, bits, stages, value_bits, heads;
};

KVCacheConfig config_of(const Shape& s) {
    KVCacheConfig c;
    c.method = "turboquant_rvq";
    c.bits = s.bits;
    c.num_residuals = s.stages;
    c.value_bits = s.value_bits;
    c.seed = 77;
    return c;
}

/// Every page a cache holds tokens in, as bytes (pools are zeroed when they grow, so pages of
/// equal contents compare equal whole).
std::vector<uint8_t> held_pages(const CudaTurboQuantCache& c) {
    const int pages = (c.size() + kTokensPerPage - 1) / kTokensPerPage;
    const std::size_t bytes = c.layout().page_bytes;
    std::vector<uint8_t> all(pages * bytes);
    for (int p = 0; p < pages; ++p) c.copy_page(p, all.data() + p * bytes);
    return all;
}

/// Sequence b's rows [heads][n][d] of a batch [batch][heads][n][d].
std::vector<float> row_of(const std::vector<float>& batch, int b, std::size_t per_sequence) {
    return {batch.begin() + b * per_sequence, batch.begin() + (b + 1) * per_sequence};
}

TEST(CudaBatch, StepsMatchEachSequencesCacheAndTheCpu) {
    SKIP_WITHOUT_DEVICE();
    const std::vector<Shape> shapes = {{128, 1, 1, 2, 2}, {64, 4, 1, 4, 2}, {128, 2, 2, 16, 1}};
    const std::vector<int> prefill = {1020, 64, 1};  // sequence 0's pool grows mid-batch
    const int batch = static_cast<int>(prefill.size()), steps = 6, group = 4;
    uint64_t seed = 900;
    for (const Shape& s : shapes) {
        SCOPED_TRACE("d" + std::to_string(s.d) + " k" + std::to_string(s.bits) + "x" +
                     std::to_string(s.stages) + " v" + std::to_string(s.value_bits));
        const KVCacheConfig c = config_of(s);
        std::vector<std::unique_ptr<CudaTurboQuantCache>> solo, joint;
        std::vector<std::unique_ptr<TurboQuantRVQKVCache>> cpu;
        for (int b = 0; b < batch; ++b) {
            solo.push_back(std::make_unique<CudaTurboQuantCache>(c, s.heads, s.d, 4096, 3));
            joint.push_back(std::make_unique<CudaTurboQuantCache>(c, s.heads, s.d, 4096, 3));
            cpu.push_back(std::make_unique<TurboQuantRVQKVCache>(c, s.heads, s.d, 4096, 3));
            const auto k = random_tokens(s.heads, prefill[b], s.d, ++seed, 1.0f);
            const auto v = random_tokens(s.heads, prefill[b], s.d, ++seed, 1.0f);
            DeviceBuffer<float> dk(k), dv(v);
            solo[b]->append(dk.get(), dv.get(), prefill[b], nullptr);
            joint[b]->append(dk.get(), dv.get(), prefill[b], nullptr);
            cpu[b]->append(k.data(), v.data(), prefill[b]);
        }
        std::vector<CudaTurboQuantCache*> appendees;
        std::vector<const CudaTurboQuantCache*> readers;
        for (auto& j : joint) appendees.push_back(j.get()), readers.push_back(j.get());
        CudaTurboQuantBatch step;
        const int hq = group * s.heads;
        const std::size_t per_token = static_cast<std::size_t>(s.heads) * s.d;
        const std::size_t per_query = static_cast<std::size_t>(hq) * s.d;
        for (int t = 0; t < steps; ++t) {
            const auto k = random_tokens(batch * s.heads, 1, s.d, ++seed, 1.0f);
            const auto v = random_tokens(batch * s.heads, 1, s.d, ++seed, 1.0f);
            DeviceBuffer<float> dk(k), dv(v);
            step.append(appendees, dk.get(), dv.get(), 1, nullptr);
            for (int b = 0; b < batch; ++b) {
                solo[b]->append(dk.get() + b * per_token, dv.get() + b * per_token, 1, nullptr);
                cpu[b]->append(row_of(k, b, per_token).data(), row_of(v, b, per_token).data(), 1);
            }
            const auto q = vqtest::randn(batch * per_query, ++seed, 0.05f);
            DeviceBuffer<float> dq(q), dout(q.size()), dsolo(per_query);
            check_cuda(cudaMemset(dout.get(), 0xff, q.size() * sizeof(float)), "poison");  // NaN
            step.attend(readers, dq.get(), hq, dout.get(), 0.1f, nullptr);
            const auto got = dout.download();
            for (int b = 0; b < batch; ++b) {
                SCOPED_TRACE("step " + std::to_string(t) + " sequence " + std::to_string(b));
                ASSERT_EQ(joint[b]->size(), prefill[b] + t + 1);
                solo[b]->attend(dq.get() + b * per_query, hq, dsolo.get(), 0.1f, nullptr);
                std::vector<float> ref(per_query);
                cpu[b]->attend(row_of(q, b, per_query).data(), hq, 1, ref.data(), 0.1f, true);
                const auto mine = row_of(got, b, per_query);
                EXPECT_LE(relative_error(mine, dsolo.download()), 1e-5);
                EXPECT_LE(relative_error(mine, ref), 1e-3);
            }
        }
        for (int b = 0; b < batch; ++b) EXPECT_EQ(held_pages(*joint[b]), held_pages(*solo[b]));
        EXPECT_GT(step.nbytes(), 0u);
    }
}

TEST(CudaBatch, BatchAppendsStoreWhatEachCacheAloneStores) {
    SKIP_WITHOUT_DEVICE();
    // Sequences of 0, 70 and 9 + 100 tokens (appended alone), then prefills (the bulk encoder)
    // and steps (the short one) through the batch. With centred keys the empty cache estimates
    // its mean on the batch's first append, and the third stays uncentred (its first append was
    // too short) yet is the longest: its page phases serve the whole batch's decode.
    const std::vector<Shape> shapes = {{128, 2, 1, 4, 2}, {64, 1, 1, 2, 3}};
    const std::vector<std::vector<int>> before = {{}, {70}, {9, 100}};
    const std::vector<int> appends = {300, 1, 5, 40};
    const int batch = static_cast<int>(before.size()), group = 4;
    uint64_t seed = 2300;
    for (const bool centred : {false, true})
        for (const Shape& s : shapes) {
            SCOPED_TRACE(std::string(centred ? "centred" : "uncentred") + " d" +
                         std::to_string(s.d) + " k" + std::to_string(s.bits));
            KVCacheConfig c = config_of(s);
            c.center_keys = centred;
            c.rope_inv_freq = vqtest::rope_freqs(s.d);
            c.rope_half_split = true;
            auto keys_of = [&](int n) {  // [batch][heads][n][d], each sequence its own mean
                std::vector<float> k;
                for (int b = 0; b < batch; ++b) {
                    const auto one =
                        vqtest::rope_keys(s.heads, n, s.d, c.rope_inv_freq, ++seed, 2.0 + b, true);
                    k.insert(k.end(), one.begin(), one.end());
                }
                return k;
            };
            std::vector<std::unique_ptr<CudaTurboQuantCache>> solo, joint;
            std::vector<CudaTurboQuantCache*> appendees;
            for (int b = 0; b < batch; ++b) {
                solo.push_back(std::make_unique<CudaTurboQuantCache>(c, s.heads, s.d, 4096));
                joint.push_back(std::make_unique<CudaTurboQuantCache>(c, s.heads, s.d, 4096));
                appendees.push_back(joint[b].get());
                for (const int n : before[b]) {
                    DeviceBuffer<float> dk(
                        vqtest::rope_keys(s.heads, n, s.d, c.rope_inv_freq, ++seed, 1.0, true)),
                        dv(random_tokens(s.heads, n, s.d, ++seed, 1.0f));
                    solo[b]->append(dk.get(), dv.get(), n, nullptr);
                    joint[b]->append(dk.get(), dv.get(), n, nullptr);
                }
            }
            CudaTurboQuantBatch step;
            for (const int n : appends) {
                SCOPED_TRACE("append " + std::to_string(n));
                const std::size_t per = static_cast<std::size_t>(s.heads) * n * s.d;
                DeviceBuffer<float> dk(keys_of(n)),
                    dv(random_tokens(batch * s.heads, n, s.d, ++seed, 1.0f));
                step.append(appendees, dk.get(), dv.get(), n, nullptr);
                for (int b = 0; b < batch; ++b)
                    solo[b]->append(dk.get() + b * per, dv.get() + b * per, n, nullptr);
                for (int b = 0; b < batch; ++b) {
                    SCOPED_TRACE("sequence " + std::to_string(b));
                    ASSERT_EQ(joint[b]->size(), solo[b]->size());
                    EXPECT_EQ(joint[b]->key_center().mean(), solo[b]->key_center().mean());
                    EXPECT_EQ(joint[b]->key_center().centering(), centred && b != 2);
                    EXPECT_EQ(held_pages(*joint[b]), held_pages(*solo[b]));
                }
                const int hq = group * s.heads;
                const std::size_t per_query = static_cast<std::size_t>(hq) * s.d;
                const auto q = vqtest::randn(batch * per_query, ++seed, 0.1f);
                DeviceBuffer<float> dq(q), dout(q.size()), dsolo(per_query);
                step.attend(
                    std::vector<const CudaTurboQuantCache*>(appendees.begin(), appendees.end()),
                    dq.get(), hq, dout.get(), 0.1f, nullptr);
                const auto got = dout.download();
                for (int b = 0; b < batch; ++b) {
                    solo[b]->attend(dq.get() + b * per_query, hq, dsolo.get(), 0.1f, nullptr);
                    EXPECT_LE(relative_error(row_of(got, b, per_query), dsolo.download()), 1e-5)
                        << "sequence " << b;
                }
            }
        }
}

TEST(CudaBatch, BadInputChangesNoCache) {
    SKIP_WITHOUT_DEVICE();
    const Shape s{128, 2, 1, 4, 2};
    const KVCacheConfig c = config_of(s);
    std::vector<std::unique_ptr<CudaTurboQuantCache>> caches;
    std::vector<CudaTurboQuantCache*> all;
    uint64_t seed = 1700;
    for (int b = 0; b < 3; ++b) {
        caches.push_back(std::make_unique<CudaTurboQuantCache>(c, s.heads, s.d, 240, 0));
        const int n = 100 + 50 * b;  // the last one is 40 tokens from full
        DeviceBuffer<float> k(random_tokens(s.heads, n, s.d, ++seed, 1.0f)),
            v(random_tokens(s.heads, n, s.d, ++seed, 1.0f));
        caches[b]->append(k.get(), v.get(), n, nullptr);
        all.push_back(caches[b].get());
    }
    std::vector<std::vector<uint8_t>> before;
    for (auto& cache : caches) before.push_back(held_pages(*cache));
    auto unchanged = [&] {
        for (int b = 0; b < 3; ++b) {
            EXPECT_EQ(caches[b]->size(), 100 + 50 * b);
            EXPECT_EQ(held_pages(*caches[b]), before[b]);
        }
    };
    CudaTurboQuantBatch step;
    const std::size_t per_token = static_cast<std::size_t>(s.heads) * s.d;
    auto keys = random_tokens(3 * s.heads, 1, s.d, ++seed, 1.0f);
    const auto values = random_tokens(3 * s.heads, 1, s.d, ++seed, 1.0f);
    keys[2 * per_token + 1 * s.d + 7] = NAN;  // sequence 2, head 1, token 0
    {
        DeviceBuffer<float> dk(keys), dv(values);
        try {
            step.append(all, dk.get(), dv.get(), 1, nullptr);
            ADD_FAILURE() << "NaN keys were accepted";
        } catch (const std::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find("sequence 2, head 1, token 0"), std::string::npos)
                << e.what();
        }
        unchanged();
    }
    keys[2 * per_token + 1 * s.d + 7] = 0.5f;
    const auto many = random_tokens(3 * s.heads, 41, s.d, ++seed, 1.0f);
    DeviceBuffer<float> dmany(many);
    EXPECT_THROW(step.append(all, dmany.get(), dmany.get(), 41, nullptr), std::length_error);
    unchanged();
    DeviceBuffer<float> dk(keys), dv(values);
    CudaTurboQuantCache other_layer(c, s.heads, s.d, 240, 1);  // other rotation signs
    DeviceBuffer<float> one(per_token);
    other_layer.append(one.get(), one.get(), 1, nullptr);
    EXPECT_THROW(step.append({all[0], all[1], &other_layer}, dk.get(), dv.get(), 1, nullptr),
                 std::invalid_argument);
    EXPECT_THROW(step.append({all[0], all[1], all[0]}, dk.get(), dv.get(), 1, nullptr),
                 std::invalid_argument);
    EXPECT_THROW(step.append({}, dk.get(), dv.get(), 1, nullptr), std::invalid_argument);
    unchanged();
    CudaTurboQuantCache empty(c, s.heads, s.d, 240, 0);
    DeviceBuffer<float> q(random_tokens(3 * 4 * s.heads, 1, s.d, ++seed, 0.1f)),
        out(4 * per_token * 3);
    EXPECT_THROW(step.attend({all[0], &empty}, q.get(), 4 * s.heads, out.get(), 0.1f, nullptr),
                 std::invalid_argument);
    EXPECT_THROW(step.attend({all[0], all[1]}, q.get(), 3, out.get(), 0.1f, nullptr),
                 std::invalid_argument);
    step.append(all, dk.get(), dv.get(), 1, nullptr);  // and a good step goes through
    for (int b = 0; b < 3; ++b) EXPECT_EQ(caches[b]->size(), 101 + 50 * b);
    // The batch remembers the caches that passed its checks; others in their places are checked
    // anew, right after a step of the remembered ones.
    const std::vector<const CudaTurboQuantCache*> readers(all.begin(), all.end());
    step.attend(readers, q.get(), 4 * s.heads, out.get(), 0.1f, nullptr);
    EXPECT_THROW(
        step.attend({all[0], all[1], &other_layer}, q.get(), 4 * s.heads, out.get(), 0.1f, nullptr),
        std::invalid_argument);
    step.attend(readers, q.get(), 4 * s.heads, out.get(), 0.1f, nullptr);
    EXPECT_THROW(step.append({all[0], all[1], all[1]}, dk.get(), dv.get(), 1, nullptr),
                 std::invalid_argument);
    for (int b = 0; b < 3; ++b) EXPECT_EQ(caches[b]->size(), 101 + 50 * b);
}

}  // namespace
}  // namespace veloxquant::cuda
