// Allocation failure: this binary replaces the global operator new so that a test can make the
// k-th allocation from now throw std::bad_alloc. Each cache call is run once for every k up to
// the number of allocations it makes, each time on a freshly built cache. The call must either
// complete, giving the bits a call that never failed gives, or throw std::bad_alloc and leave the
// cache as it was (its saved file identical), so that calling it again gives those bits. A throw
// inside an OpenMP region would end the process instead (core/parallel_errors.h).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <new>

#include "calibration/calibrate.h"
#include "calibration_test_helpers.h"
#include "test_helpers.h"
#include "veloxquant/veloxquant.h"

namespace {
// >= 0: allocations left before the one that fails; < 0: none fails.
std::atomic<long long> g_countdown{-1};
std::atomic<bool> g_fired{false};

bool inject_failure() {
    if (g_countdown.load(std::memory_order_relaxed) < 0) return false;
    if (g_countdown.fetch_sub(1) != 0) return false;
    g_fired = true;
    return true;
}

void* allocate(std::size_t n, std::size_t align) {
    if (inject_failure()) throw std::bad_alloc();
    if (n == 0) n = 1;
    void* p = nullptr;
    if (align <= alignof(std::max_align_t))
        p = std::malloc(n);
    else if (posix_memalign(&p, align, n) != 0)
        p = nullptr;
    if (p == nullptr) throw std::bad_alloc();
    return p;
}

void* allocate_nothrow(std::size_t n, std::size_t align) noexcept {
    try {
        return allocate(n, align);
    } catch (const std::bad_alloc&) {
        return nullptr;
    }
}
}  // namespace

void* operator new(std::size_t n) {
    return allocate(n, 0);
}
void* operator new[](std::size_t n) {
    return allocate(n, 0);
}
void* operator new(std::size_t n, std::align_val_t a) {
    return allocate(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
    return allocate(n, static_cast<std::size_t>(a));
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
    return allocate_nothrow(n, 0);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
    return allocate_nothrow(n, 0);
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
    return allocate_nothrow(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
    return allocate_nothrow(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept {
    std::free(p);
}
void operator delete[](void* p) noexcept {
    std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
    std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
    std::free(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete[](void* p, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
    std::free(p);
}

using namespace veloxquant;

namespace {

constexpr int kHeads = 2, kDim = 64, kCapacity = 256;

std::vector<char> file_bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// What a cache holds, as its saved file: tokens, codec state, observer statistics.
std::vector<char> saved(const KVCache& cache, const std::string& path) {
    cache.save(path);
    return file_bytes(path);
}

std::vector<float> tokens(std::size_t n_tokens, uint64_t seed) {
    auto x = vqtest::randn(static_cast<std::size_t>(kHeads) * n_tokens * kDim, seed);
    x[kDim * 3] *= 6.0f;  // a key norm the outlier observer can flag, once it has statistics
    return x;
}

struct Scenario {
    std::string name;
    std::function<std::unique_ptr<KVCache>()> make;  // a fresh cache, observer included
    int prefill = 0;                                 // tokens held before the call
};

void PrintTo(const Scenario& s, std::ostream* os) {
    *os << s.name;
}

// The cache a scenario starts from; nothing fails while it is built.
std::unique_ptr<KVCache> start(const Scenario& s) {
    auto cache = s.make();
    if (s.prefill > 0) {
        const auto k = tokens(s.prefill, 11), v = tokens(s.prefill, 12);
        cache->append(k.data(), v.data(), s.prefill);
    }
    return cache;
}

// Runs call(cache) on a fresh start(s) with the k-th allocation failing, for every k until a
// call completes without reaching its failing allocation. result(cache) is what the call must
// produce, compared with a run where nothing fails. Returns the number of allocations seen.
long long fail_each_allocation(const Scenario& s, const std::function<void(KVCache&)>& call,
                               const std::function<std::vector<char>(KVCache&)>& result) {
    const std::string path = vqtest::unique_temp_path("alloc_failure.vqc");
    std::vector<char> expected;
    {
        auto clean = start(s);
        call(*clean);
        expected = result(*clean);
    }
    for (long long k = 0;; ++k) {
        auto cache = start(s);
        const std::vector<char> before = saved(*cache, path);
        g_fired = false;
        g_countdown = k;
        bool threw = false;
        try {
            call(*cache);
        } catch (const std::bad_alloc&) {
            threw = true;
        }
        g_countdown = -1;
        const bool fired = g_fired;
        if (threw) {
            EXPECT_TRUE(fired) << "bad_alloc with no failure injected, at k = " << k;
            EXPECT_EQ(saved(*cache, path), before) << "a failed call changed the cache, k = " << k;
            call(*cache);  // the retry, nothing failing
        }
        EXPECT_EQ(result(*cache), expected) << "k = " << k << (threw ? " (retried)" : "");
        if (::testing::Test::HasFailure() || !fired) {
            std::filesystem::remove(path);
            return k;
        }
    }
}

std::unique_ptr<KVCache> quantized(KVCacheConfig cfg, bool outliers) {
    if (outliers) {
        cfg.outlier_observer = std::make_shared<KeyNormObserver>(2.0, 16);
        cfg.outlier_bits = 8;
    }
    return KVCacheFactory::create(cfg, kHeads, kDim, kCapacity);
}

KVCacheConfig config_of(const std::string& method) {
    KVCacheConfig c;
    c.method = method;
    c.num_clusters = 4;
    return c;
}

std::vector<Scenario> scenarios() {
    std::vector<Scenario> out;
    for (const std::string method :
         {"turboquant_rvq", "qjl", "polarquant", "rabitq", "ratequant", "fp16"})
        for (const bool outliers : {false, true})
            for (const int prefill : {0, 40})
                out.push_back(
                    {method + (outliers ? "+outliers" : "") + "@" + std::to_string(prefill),
                     [=] { return quantized(config_of(method), outliers); }, prefill});
    const Activations acts = vqtest::synthetic_activations(1, kHeads, kDim, 256, 41);
    for (const std::string method : {"vecinfer", "spectral", "commvq"}) {
        KVCacheConfig c = config_of(method);
        c.bits = 2;
        Calibration cal;
        calibrate_method(acts, c, cal);
        apply_calibration(cal, c);
        out.push_back({method + "@40", [=] { return quantized(c, true); }, 40});
    }
    out.push_back(
        {"window",
         [] {
             auto inner = quantized(config_of("turboquant_rvq"), true);
             return std::make_unique<SlidingWindowKVCache>(
                 std::unique_ptr<QuantizedKVCache>(static_cast<QuantizedKVCache*>(inner.release())),
                 48, 4);
         },
         40});
    return out;
}

class AllocFailure : public ::testing::TestWithParam<Scenario> {};

TEST_P(AllocFailure, AppendLeavesTheCacheAsItWas) {
    const std::string path = vqtest::unique_temp_path("alloc_append.vqc");
    const auto k = tokens(30, 21), v = tokens(30, 22);
    const long long seen = fail_each_allocation(
        GetParam(), [&](KVCache& c) { c.append(k.data(), v.data(), 30); },
        [&](KVCache& c) { return saved(c, path); });
    std::filesystem::remove(path);
    RecordProperty("allocations", std::to_string(seen));
}

TEST_P(AllocFailure, AttendThrowsBadAllocOrAnswers) {
    const int nq = 3;
    const auto q = vqtest::randn(static_cast<std::size_t>(2 * kHeads) * nq * kDim, 31);
    std::vector<float> out(q.size());
    const bool causal = GetParam().prefill >= nq;  // an empty cache answers zeros, not causally
    fail_each_allocation(
        GetParam(),
        [&](KVCache& c) { c.attend(q.data(), 2 * kHeads, nq, out.data(), 0.125f, causal); },
        [&](KVCache&) {
            const char* b = reinterpret_cast<const char*>(out.data());
            return std::vector<char>(b, b + out.size() * sizeof(float));
        });
}

TEST_P(AllocFailure, SaveKeepsTheFileThereAndLoadReadsItBack) {
    // A directory of its own, so that the files other tests write do not count.
    const std::filesystem::path dir = vqtest::unique_temp_path("alloc_save");
    std::filesystem::create_directories(dir);
    const std::string path = (dir / "cache.vqc").string();
    auto entries = [&] {
        return std::distance(std::filesystem::directory_iterator(dir),
                             std::filesystem::directory_iterator());
    };
    start(GetParam())->save(path);
    const std::vector<char> old_file = file_bytes(path);
    const auto n_entries = entries();
    // The cache saved again over that file: a failed save leaves the old file and no temporary.
    auto grown = start(GetParam());
    const auto k = tokens(5, 41), v = tokens(5, 42);
    grown->append(k.data(), v.data(), 5);
    for (long long at = 0;; ++at) {
        g_fired = false;
        g_countdown = at;
        bool threw = false;
        try {
            grown->save(path);
        } catch (const std::bad_alloc&) {
            threw = true;
        }
        g_countdown = -1;
        if (!threw) break;
        ASSERT_EQ(file_bytes(path), old_file) << "k = " << at;
        ASSERT_EQ(entries(), n_entries) << "a temporary file was left, k = " << at;
    }
    const std::vector<char> new_file = file_bytes(path);
    // Load: bad_alloc or the same cache.
    for (long long at = 0;; ++at) {
        g_fired = false;
        g_countdown = at;
        std::unique_ptr<KVCache> loaded;
        try {
            loaded = KVCache::load(path);
        } catch (const std::bad_alloc&) {
        }
        g_countdown = -1;
        if (!loaded) continue;
        const std::string again = vqtest::unique_temp_path("alloc_load.vqc");
        EXPECT_EQ(saved(*loaded, again), new_file) << "k = " << at;
        std::filesystem::remove(again);
        if (!g_fired || ::testing::Test::HasFailure()) break;
    }
    std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Caches, AllocFailure, ::testing::ValuesIn(scenarios()),
                         [](const auto& info) {
                             std::string n = info.param.name;
                             for (char& ch : n)
                                 if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                             return n;
                         });

// Calibration fits heads in OpenMP loops: a failed allocation there is a bad_alloc for the
// caller; a fit that completes is the one where nothing failed.
TEST(AllocFailureCalibration, FitsThrowBadAllocOrGiveTheSameResult) {
    const Activations acts = vqtest::synthetic_activations(1, kHeads, kDim, 256, 43);
    const std::string path = vqtest::unique_temp_path("alloc_calibration.vqc");
    for (const std::string method : {"vecinfer", "spectral", "commvq"}) {
        SCOPED_TRACE(method);
        KVCacheConfig c = config_of(method);
        c.bits = 2;
        // A calibration, seen through a cache it configures.
        auto result = [&](const Calibration& cal) {
            KVCacheConfig applied = c;
            apply_calibration(cal, applied);
            auto cache = quantized(applied, false);
            const auto k = tokens(20, 51), v = tokens(20, 52);
            cache->append(k.data(), v.data(), 20);
            return saved(*cache, path);
        };
        Calibration clean;
        calibrate_method(acts, c, clean);
        const std::vector<char> expected = result(clean);
        long long at = 0;
        for (;; at += 1 + at / 16) {  // every allocation early on, then sparser
            g_fired = false;
            g_countdown = at;
            Calibration cal;
            bool completed = false;
            try {
                calibrate_method(acts, c, cal);
                completed = true;
            } catch (const std::bad_alloc&) {
            }
            g_countdown = -1;
            if (completed) ASSERT_EQ(result(cal), expected) << "k = " << at;
            if (!g_fired) break;
        }
        RecordProperty(method + "_allocations", std::to_string(at));
    }
    std::filesystem::remove(path);
}

}  // namespace
