// The tuned turboquant cache to and from the CPU's caches and their files: to_host gives the
// CPU's TurboQuantRVQKVCache holding the same pages (a SlidingWindowKVCache around it for a
// window, a centred cache's key mean in its codecs), which decodes as the device does (1e-3);
// save writes its file, which KVCache::load and CudaTurboQuantCache::load read back (the device
// copy decodes as the saved cache, 1e-6); from_host takes a cache made on the CPU; a file or
// cache the tuned kernels cannot hold, a truncated file, and a centred cache whose mean was
// never set are refused with specific errors. Skips without a device.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache/paged_store.h"
#include "cuda/cuda_cache.h"
#include "cuda_test_helpers.h"
#include "rope_test_keys.h"
#include "test_helpers.h"
#include "veloxquant/caches.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;
using vqtest::random_tokens;
using vqtest::relative_error;

constexpr int kHeads = 2, kDim = 128, kQueryHeads = 8, kMaxLen = 4096;

KVCacheConfig tq_config(bool centred) {
    KVCacheConfig c = vqtest::method_config("turboquant_rvq", 2, 4, 17);
    if (centred) {
        c.center_keys = true;
        c.rope_inv_freq = vqtest::rope_freqs(kDim);
    }
    return c;
}

// One decode query per query head through the device cache.
std::vector<float> device_decode(const CudaTurboQuantCache& gpu, const std::vector<float>& q) {
    DeviceBuffer<float> dq(q), dout(q.size());
    gpu.attend(dq.get(), kQueryHeads, dout.get(), 0.125f, nullptr);
    return dout.download();
}

std::vector<float> host_decode(const KVCache& cpu, const std::vector<float>& q) {
    std::vector<float> out(q.size());
    cpu.attend(q.data(), kQueryHeads, 1, out.data(), 0.125f, true);
    return out;
}

// A prompt of 700 tokens (keys with a strong pre-RoPE mean where centred) and 70 decode steps.
void fill(CudaTurboQuantCache& gpu, const KVCacheConfig& config, uint64_t seed) {
    for (const int n : {700, 70}) {
        const int chunk = n == 700 ? 700 : 1;
        for (int done = 0; done < n; done += chunk) {
            const auto k = config.center_keys
                               ? vqtest::rope_keys(kHeads, chunk, kDim, config.rope_inv_freq,
                                                   ++seed, 3.0, config.rope_half_split)
                               : random_tokens(kHeads, chunk, kDim, ++seed, 0.5f);
            const auto v = random_tokens(kHeads, chunk, kDim, ++seed, 0.5f);
            DeviceBuffer<float> dk(k), dv(v);
            gpu.append(dk.get(), dv.get(), chunk, nullptr);
        }
    }
}

struct FilesCase {
    std::string name;
    bool centred;
    int window, sinks;
};

class TurboQuantFiles : public ::testing::TestWithParam<FilesCase> {};

TEST_P(TurboQuantFiles, GoesToTheCpuAndItsFilesAndBack) {
    SKIP_WITHOUT_DEVICE();
    const FilesCase& k = GetParam();
    const KVCacheConfig config = tq_config(k.centred);
    CudaTurboQuantCache gpu(config, kHeads, kDim, kMaxLen, 3, k.window, k.sinks);
    fill(gpu, config, 100);
    const auto q = vqtest::randn(static_cast<std::size_t>(kQueryHeads) * kDim, 7, 1.0f);
    const auto on_device = device_decode(gpu, q);

    const auto host = gpu.host_cache();
    EXPECT_EQ(host->class_name(), k.window > 0 ? "SlidingWindowKVCache" : "TurboQuantRVQKVCache");
    EXPECT_EQ(host->size(), gpu.size());
    EXPECT_LE(relative_error(host_decode(*host, q), on_device), 1e-3) << "to_host";

    const std::string path = vqtest::unique_temp_path("tq.vqc");
    gpu.save(path);
    const auto loaded = KVCache::load(path);
    EXPECT_EQ(loaded->class_name(), host->class_name());
    EXPECT_LE(relative_error(host_decode(*loaded, q), on_device), 1e-3) << "KVCache::load";
    const auto back = CudaTurboQuantCache::load(path);
    EXPECT_EQ(back->size(), gpu.size());
    EXPECT_EQ(back->window(), k.window);
    EXPECT_EQ(back->sink_tokens(), k.window > 0 ? k.sinks : 0);
    EXPECT_EQ(back->key_center().centering(), gpu.key_center().centering());
    EXPECT_LE(relative_error(device_decode(*back, q), on_device), 1e-6) << "load";
    for (int p = 0; p * kTokensPerPage < gpu.size(); ++p)
        EXPECT_EQ(back->position_held(p * kTokensPerPage), gpu.position_held(p * kTokensPerPage));

    // A truncated file: KVCache::load's error, nothing made.
    {
        std::ifstream in(path, std::ios::binary);
        std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
        bytes.resize(bytes.size() - 10);
        std::ofstream(path, std::ios::binary | std::ios::trunc)
            .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
    EXPECT_THROW(CudaTurboQuantCache::load(path), std::runtime_error);
    std::remove(path.c_str());

    // Back and forth: a device copy of the CPU copy decodes as both, and appends go on there.
    const auto again = CudaTurboQuantCache::from_host(*host);
    EXPECT_LE(relative_error(device_decode(*again, q), on_device), 1e-6) << "from_host";
    const auto one = random_tokens(kHeads, 1, kDim, 99, 0.5f);
    DeviceBuffer<float> d1(one);
    again->append(d1.get(), d1.get(), 1, nullptr);
    host->append(one.data(), one.data(), 1);
    EXPECT_LE(relative_error(device_decode(*again, q), host_decode(*host, q)), 1e-3)
        << "append after from_host";
}

INSTANTIATE_TEST_SUITE_P(Cases, TurboQuantFiles,
                         ::testing::Values(FilesCase{"plain", false, 0, 0},
                                           FilesCase{"centred", true, 0, 0},
                                           FilesCase{"window", false, 200, 4}),
                         [](const auto& info) { return info.param.name; });

// A cache made on the CPU goes onto the device and decodes as the CPU does.
TEST(TurboQuantFromHost, TakesACacheMadeOnTheCpu) {
    SKIP_WITHOUT_DEVICE();
    const KVCacheConfig config = tq_config(false);
    TurboQuantRVQKVCache cpu(config, kHeads, kDim, kMaxLen, 1);
    const auto k = random_tokens(kHeads, 500, kDim, 5, 0.5f),
               v = random_tokens(kHeads, 500, kDim, 6, 0.5f);
    cpu.append(k.data(), v.data(), 500);
    const auto gpu = CudaTurboQuantCache::from_host(cpu);
    const auto q = vqtest::randn(static_cast<std::size_t>(kQueryHeads) * kDim, 8, 1.0f);
    EXPECT_LE(relative_error(device_decode(*gpu, q), host_decode(cpu, q)), 1e-3);
}

TEST(TurboQuantFromHost, RefusesWhatTheTunedKernelsCannotHold) {
    SKIP_WITHOUT_DEVICE();
    // Another method's cache and file: the tuned cache's scope error.
    FP16KVCache fp16(vqtest::method_config("fp16", 4, 16, 1), kHeads, kDim, kMaxLen);
    const auto k = random_tokens(kHeads, 10, kDim, 5, 0.5f);
    fp16.append(k.data(), k.data(), 10);
    EXPECT_THROW(CudaTurboQuantCache::from_host(fp16), std::invalid_argument);
    const std::string path = vqtest::unique_temp_path("fp16.vqc");
    fp16.save(path);
    EXPECT_THROW(CudaTurboQuantCache::load(path), std::invalid_argument);
    std::remove(path.c_str());
    // A centred cache whose uploaded pages came without their mean: to_host refuses.
    const KVCacheConfig centred = tq_config(true);
    TurboQuantRVQKVCache cpu(centred, kHeads, kDim, kMaxLen);
    const auto rk = vqtest::rope_keys(kHeads, 100, kDim, centred.rope_inv_freq, 3, 3.0, false);
    const auto rv = random_tokens(kHeads, 100, kDim, 4, 0.5f);
    cpu.append(rk.data(), rv.data(), 100);
    CudaTurboQuantCache gpu(centred, kHeads, kDim, kMaxLen);
    gpu.upload(cpu.paged_store(), cpu.size());
    EXPECT_THROW(gpu.to_host(), std::invalid_argument);
}

}  // namespace
}  // namespace veloxquant::cuda
