#include "cuda/rabitq_training.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "cuda/cuda_cache.h"
#include "cuda/kmeans_device.h"
#include "cuda/team_encode.cuh"
#include "device_codecs/device_common.h"
#include "methods/key_codec.h"
#include "methods/rabitq.h"

namespace veloxquant::cuda {
namespace {

/// points [heads][m][d] = R_h head_keys[h][training_row(i, n, m)] for i < m, a CTA (a team) a row
/// at a time: the rows RaBitQCodec::rotated_training_rows writes on the host, in its arithmetic
/// (team::rotate runs dev::rotate_forward's operations across the team).
__global__ void __launch_bounds__(team::kTeam)
    rotate_training_rows(const float* const* head_keys, int heads, int n, int m, int d,
                         const dev::RotationParams* rotations, float* points) {
    __shared__ float x[dev::kMaxDim], y[dev::kMaxDim];
    const long long rows = static_cast<long long>(heads) * m;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const int h = static_cast<int>(row / m), i = static_cast<int>(row % m);
        const float* key = head_keys[h] + static_cast<std::size_t>(training_row(i, n, m)) * d;
        for (int j = team::rank(); j < d; j += team::kTeam) x[j] = key[j];
        team::sync();
        team::rotate(rotations[h], x, y);  // reads x before its last barrier, which ends it
        float* out = points + static_cast<std::size_t>(row) * d;
        for (int j = team::rank(); j < d; j += team::kTeam) out[j] = y[j];
    }
}

std::size_t padded(std::size_t bytes) {
    return (bytes + 255) / 256 * 256;
}

}  // namespace

bool train_rabitq_on_device(const std::vector<KeyCodec*>& codecs,
                            const std::vector<const float*>& head_keys, int n_tokens,
                            cudaStream_t stream) {
    std::vector<RaBitQCodec*> rabitq;
    for (KeyCodec* c : codecs)
        if (auto* r = dynamic_cast<RaBitQCodec*>(c); r != nullptr && r->needs_training())
            rabitq.push_back(r);
    if (rabitq.empty() || rabitq.size() != codecs.size() || head_keys.size() != codecs.size())
        return false;
    const int heads = static_cast<int>(rabitq.size()), d = rabitq[0]->dim();
    const RaBitQCodec::KMeansProblem p = rabitq[0]->kmeans_problem(n_tokens);  // p.n rows
    // The heads' rotations (signs or matrices) as the device codecs carry them, their
    // parameters, and the rotated rows: one allocation. The sets of one k-means call share n, k
    // and d: codecs of other shapes (a batch of differently configured caches) decline.
    dev::ParamArena arena;
    std::vector<dev::RotationParams> rotations;
    std::vector<uint64_t> seeds;
    for (RaBitQCodec* r : rabitq) {
        const RaBitQCodec::KMeansProblem q = r->kmeans_problem(n_tokens);
        if (r->dim() != d || q.n != p.n || q.k != p.k) return false;
        rotations.push_back(dev::build_rotation(r->rotation(), arena));
        seeds.push_back(q.seed);
    }
    const std::size_t table_bytes = padded(arena.bytes().size());
    const std::size_t params_bytes = padded(rotations.size() * sizeof(dev::RotationParams));
    const std::size_t keys_bytes = padded(head_keys.size() * sizeof(const float*));
    const std::size_t points_bytes = static_cast<std::size_t>(heads) * p.n * d * sizeof(float);
    uint8_t* block = nullptr;
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&block),
                               table_bytes + params_bytes + keys_bytes + points_bytes, stream),
               "rabitq training: device memory");
    std::vector<KMeansResult> km;
    try {
        for (dev::RotationParams& r : rotations) r.rebase(block);
        check_cuda(cudaMemcpyAsync(block, arena.bytes().data(), arena.bytes().size(),
                                   cudaMemcpyHostToDevice, stream),
                   "rabitq training: copy rotations");
        auto* params = reinterpret_cast<dev::RotationParams*>(block + table_bytes);
        check_cuda(cudaMemcpyAsync(params, rotations.data(),
                                   rotations.size() * sizeof(dev::RotationParams),
                                   cudaMemcpyHostToDevice, stream),
                   "rabitq training: copy rotations");
        auto* keys = reinterpret_cast<const float**>(block + table_bytes + params_bytes);
        check_cuda(cudaMemcpyAsync(keys, head_keys.data(), head_keys.size() * sizeof(const float*),
                                   cudaMemcpyHostToDevice, stream),
                   "rabitq training: copy key addresses");
        auto* points = reinterpret_cast<float*>(block + table_bytes + params_bytes + keys_bytes);
        const long long rows = static_cast<long long>(heads) * p.n;
        rotate_training_rows<<<static_cast<unsigned>(std::min(rows, 4096LL)), team::kTeam, 0,
                               stream>>>(keys, heads, n_tokens, p.n, d, params, points);
        check_cuda(cudaGetLastError(), "rabitq training: rotate rows");
        km = kmeans_on_device_points(points, heads, p.n, d, p.k, seeds.data(), {}, stream);
    } catch (...) {
        cudaFreeAsync(block, stream);
        throw;
    }
    check_cuda(cudaFreeAsync(block, stream), "rabitq training: device memory");
    for (int h = 0; h < heads; ++h) rabitq[h]->adopt_centroids(std::move(km[h].centroids), km[h].k);
    return true;
}

}  // namespace veloxquant::cuda
