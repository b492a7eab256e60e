// commvq's tensor-core codeword search (commvq_nearest_tensor, commvq_search.cuh) must return
// the CPU codec's index (methods/commvq.h: commvq_nearest, the codec's rounding, first index of
// the least) for every residual: random ones, near and exact ties between codewords (midpoints,
// duplicated codewords, x = 0 over codewords of one norm: every codeword a candidate),
// tiny residuals (subnormal products), huge ones (past the bound: the lane's scalar scan), and
// warps whose lanes are partly inactive; each without a known codeword and with one (the ICM
// sweep's bound: the CPU's answer, another codeword, a random one; one lane without). The lane
// scan (commvq_scan, as CommVQDevice::nearest) runs beside it on the device. Slices of 8, 64 and
// 256 codewords. Skips without a device, or below sm_80 (no tf32 mma). Compiles with
// --fmad=false, as the encoders.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/commvq_search.cuh"
#include "cuda_test_helpers.h"
#include "methods/commvq.h"

namespace veloxquant::cuda {
namespace {

using codec::CvqWarpRows;
using codec::kCvqTensorDim;
using vqtest::DeviceBuffer;

constexpr int kD = kCvqTensorDim, kMaxC = 256, kWarps = 4;

// One token per thread; tokens past n or with active[t] == 0 pass active = false; known[t] (or
// -1 where known is null) the codeword that bounds the search.
__global__ void search_kernel(const float* words, const float* norms2, const float* bound, int C,
                              const float* x, const int* active, const int* known, int n,
                              int* tensor_out, int* scan_out, int* scanned_out) {
    __shared__ __align__(16) float s_words[kMaxC * kD];
    __shared__ __align__(16) float s_norms[kMaxC];
    __shared__ __align__(16) uint2 s_frag[codec::cvq_fragment_bytes(kMaxC) / 8];
    __shared__ float s_bound[1 + kD];
    __shared__ CvqWarpRows rows[kWarps];
    const int tid = static_cast<int>(threadIdx.x);
    codec::cvq_stage_tensor_slice(words, norms2, bound, C, s_words, s_norms, s_frag, s_bound, tid,
                                  static_cast<int>(blockDim.x));
    __syncthreads();
    const int t = static_cast<int>(blockIdx.x * blockDim.x) + tid;
    float r[kD] = {};
    if (t < n)
        for (int j = 0; j < kD; ++j) r[j] = x[static_cast<size_t>(t) * kD + j];
    const bool on = t < n && active[t] != 0;
    bool scanned = false;
    const int k = known != nullptr && t < n ? known[t] : -1;
    const int b = codec::commvq_nearest_tensor(r, on, k, s_words, s_norms, s_frag, s_bound, C,
                                               rows[tid / 32], &scanned);
    if (t >= n) return;
    tensor_out[t] = on ? b : -2;
    scanned_out[t] = scanned;
    float m = INFINITY;
    int best = -1;
    codec::commvq_scan<kD>(r, s_words, s_norms, 0, C, kD, &m, &best);
    scan_out[t] = best < 0 ? C - 1 : best;
}

struct Slice {
    std::vector<float> words, norms2, bound;  // words [C][kD]
};

Slice make_slice(std::vector<float> words, int C) {
    Slice s;
    s.words = std::move(words);
    s.norms2.resize(C);
    for (int c = 0; c < C; ++c) {  // as CommVQCodec: double sums rounded to float
        double a = 0.0;
        for (int j = 0; j < kD; ++j)
            a += static_cast<double>(s.words[c * kD + j]) * s.words[c * kD + j];
        s.norms2[c] = static_cast<float>(a);
    }
    std::vector<float> wt(static_cast<size_t>(C) * kD);
    commvq_transpose(s.words.data(), C, kD, wt.data());
    s.bound.resize(1 + kD);
    commvq_search_bound(wt.data(), s.norms2.data(), C, kD, s.bound.data());
    return s;
}

std::vector<float> gaussian(size_t n, float sigma, std::mt19937& rng) {
    std::normal_distribution<float> N(0.0f, sigma);
    std::vector<float> v(n);
    for (float& x : v) x = N(rng);
    return v;
}

constexpr int kRandom = 4096;  // the first tokens: N(0, 1) residuals

// Residuals of every kind for a slice (the last 64 past the bound); active flags (some lanes
// off in the second warp).
void make_tokens(const Slice& s, int C, std::mt19937& rng, std::vector<float>* x,
                 std::vector<int>* active) {
    std::uniform_int_distribution<int> pick(0, C - 1);
    const auto add = [&](const float* v, float scale) {
        for (int j = 0; j < kD; ++j) x->push_back(v[j] * scale);
    };
    const auto noise = gaussian(kRandom * kD, 1.0f, rng);
    for (int i = 0; i < kRandom; ++i) add(&noise[i * kD], 1.0f);  // random
    for (int i = 0; i < 512; ++i) {                               // midpoints: near-ties
        const int a = pick(rng), b = pick(rng);
        float mid[kD];
        for (int j = 0; j < kD; ++j) mid[j] = 0.5f * (s.words[a * kD + j] + s.words[b * kD + j]);
        add(mid, 1.0f);
    }
    for (int i = 0; i < 256; ++i) add(&s.words[pick(rng) * kD], 1.0f);  // codewords themselves
    const float zero[kD] = {};
    for (int i = 0; i < 64; ++i) add(zero, 1.0f);
    for (int i = 0; i < 256; ++i) add(&noise[i * kD], 1e-30f);  // norms2 decide, near-ties
    for (int i = 0; i < 64; ++i) add(&noise[i * kD], 1e-39f);   // subnormal coordinates
    for (int i = 0; i < 256; ++i) add(&noise[i * kD], 1e20f);   // under the bound's limit
    for (int i = 0; i < 64; ++i) add(&noise[i * kD], 1e33f);    // T past 2^100: the lane scan
    const int n = static_cast<int>(x->size() / kD);
    active->assign(n, 1);
    for (int t = 32 + 25; t < 64; ++t) (*active)[t] = 0;
}

// The tensor search of every token of `x` with known codewords `known` (empty: none) against the
// CPU's answers `ref`; the lane scan too.
void check_search(const Slice& s, int C, const std::vector<float>& x,
                  const std::vector<int>& active, const std::vector<int>& known,
                  const std::vector<int>& ref, const char* what) {
    SCOPED_TRACE(what);
    const int n = static_cast<int>(active.size());
    DeviceBuffer<float> dw(s.words), dn(s.norms2), db(s.bound), dx(x);
    DeviceBuffer<int> da(active), dk(known.empty() ? std::vector<int>(1) : known),
        dt(static_cast<size_t>(n)), ds(static_cast<size_t>(n)), dsc(static_cast<size_t>(n));
    search_kernel<<<(n + 32 * kWarps - 1) / (32 * kWarps), 32 * kWarps>>>(
        dw.get(), dn.get(), db.get(), C, dx.get(), da.get(), known.empty() ? nullptr : dk.get(), n,
        dt.get(), ds.get(), dsc.get());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto tensor = dt.download(), scan = ds.download(), scanned = dsc.download();
    // The tensor search decides (almost) all random residuals itself; past the bound, the lane
    // scans.
    int random_scanned = 0;
    for (int t = 0; t < kRandom; ++t) random_scanned += scanned[t];
    std::printf("[ C %3d %-30s ] %d of %d random residuals scanned, %d of all %d\n", C, what,
                random_scanned, kRandom,
                static_cast<int>(std::count(scanned.begin(), scanned.end(), 1)), n);
    EXPECT_LE(random_scanned, kRandom / 100);
    for (int t = n - 64; t < n; ++t) EXPECT_EQ(scanned[t], 1) << "token " << t;
    int wrong = 0, scan_wrong = 0;
    for (int t = 0; t < n; ++t) {
        scan_wrong += scan[t] != ref[t];
        if (active[t] == 0) {
            EXPECT_EQ(tensor[t], -2);
            continue;
        }
        if (tensor[t] != ref[t] && ++wrong <= 5)
            ADD_FAILURE() << "token " << t << ": tensor " << tensor[t] << ", CPU " << ref[t];
    }
    EXPECT_EQ(wrong, 0) << "of " << n;
    EXPECT_EQ(scan_wrong, 0) << "the lane scan against the CPU";
}

void run_case(const Slice& s, int C, std::mt19937& rng, const char* what) {
    std::vector<float> x;
    std::vector<int> active;
    make_tokens(s, C, rng, &x, &active);
    const int n = static_cast<int>(active.size());
    std::vector<float> wt(static_cast<size_t>(C) * kD);
    commvq_transpose(s.words.data(), C, kD, wt.data());
    std::vector<int> ref(n);
    for (int t = 0; t < n; ++t)
        ref[t] = commvq_nearest(&x[static_cast<size_t>(t) * kD], wt.data(), s.norms2.data(), C, kD);
    check_search(s, C, x, active, {}, ref, what);
    // Known codewords: the answer itself, the next one, a random one; token 200's lane gives
    // none (its warp takes the first pass).
    std::uniform_int_distribution<int> pick(0, C - 1);
    std::vector<int> known(n);
    for (int t = 0; t < n; ++t)
        known[t] = t % 3 == 0 ? ref[t] : t % 3 == 1 ? (ref[t] + 1) % C : pick(rng);
    known[200] = -1;
    check_search(s, C, x, active, known, ref, (std::string(what) + ", known codewords").c_str());
}

bool has_tf32_mma() {
    int device = 0, major = 0;
    return cudaGetDevice(&device) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
               cudaSuccess &&
           major >= 8;
}

TEST(CommvqTensorSearch, MatchesTheCpuSearch) {
    SKIP_WITHOUT_DEVICE();
    if (!has_tf32_mma()) GTEST_SKIP() << "tf32 mma needs sm_80";
    std::mt19937 rng(61);
    for (const int C : {8, 64, 256}) {
        SCOPED_TRACE(C);
        run_case(make_slice(gaussian(static_cast<size_t>(C) * kD, 0.7f, rng), C), C, rng,
                 "gaussian codewords");
        // Duplicated codewords (exact ties: the first index), one coordinate subnormal.
        auto dup = gaussian(static_cast<size_t>(C) * kD, 0.7f, rng);
        for (int c = C / 2; c < C; ++c)
            for (int j = 0; j < kD; ++j) dup[c * kD + j] = dup[(c - C / 2) * kD + j];
        dup[3] = 1e-41f;
        run_case(make_slice(dup, C), C, rng, "duplicates");
        // Sign flips of one vector: every norm equal, so x = 0 ties all C codewords.
        const auto base = gaussian(kD, 1.0f, rng);
        std::vector<float> flips(static_cast<size_t>(C) * kD);
        for (int c = 0; c < C; ++c)
            for (int j = 0; j < kD; ++j)
                flips[c * kD + j] = (c >> (j % 8)) & 1 ? -base[j] : base[j];
        run_case(make_slice(flips, C), C, rng, "one norm");
    }
}

}  // namespace
}  // namespace veloxquant::cuda
