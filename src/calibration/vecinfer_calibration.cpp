#include "calibration/vecinfer_calibration.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "core/kmeans.h"
#include "core/parallel_errors.h"
#include "core/rng.h"
#include "core/rotation.h"
#include "methods/vecinfer.h"

namespace veloxquant {
namespace {

constexpr float kMaxFloor = 1e-4f;

// Per-channel max |x| over the rows of a head, floored.
std::vector<float> channel_absmax(const HeadSamples& s) {
    std::vector<float> m(s.dim, kMaxFloor);
    for (int64_t i = 0; i < s.count(); ++i) {
        const float* r = s.row(i);
        for (int j = 0; j < s.dim; ++j) m[j] = std::max(m[j], std::fabs(r[j]));
    }
    return m;
}

// Smoothed, rotated training rows of one head: at most max_samples, evenly spaced.
std::vector<float> transformed_rows(const HeadSamples& keys, const std::vector<float>& smooth,
                                    const Rotation& rot, int max_samples, int* n_out) {
    const int64_t total = keys.count();
    const int n = static_cast<int>(std::min<int64_t>(total, max_samples));
    const int d = keys.dim;
    std::vector<float> x(static_cast<std::size_t>(n) * d);
    for (int i = 0; i < n; ++i) {
        const float* k = keys.row(static_cast<int64_t>(i) * total / n);
        float* out = &x[static_cast<std::size_t>(i) * d];
        for (int j = 0; j < d; ++j) out[j] = k[j] / smooth[j];
        rot.forward(out, out);
    }
    *n_out = n;
    return x;
}

// Lloyd iterations (k-means) on sub [n][sub_dim] from the centroids [k][sub_dim] given, with
// the vectorised nearest-codeword search of the codec (kmeans.cpp's generic search is several
// times slower at sub_dim 1..8, which dominates calibration). Sums are accumulated in point
// order in double, so the result is deterministic. An empty cluster takes the point farthest
// from its centroid. Stops when no assignment changes or the objective improves by < 1e-4.
void lloyd(const float* sub, int n, int sub_dim, int k, float* centroids, int iterations) {
    std::vector<float> cent_t(static_cast<std::size_t>(k) * sub_dim), half(k), dist2(n);
    std::vector<int> assign(n, -1), counts(k);
    std::vector<double> sums(static_cast<std::size_t>(k) * sub_dim);
    double previous = INFINITY;
    for (int it = 0; it <= iterations; ++it) {
        for (int c = 0; c < k; ++c) {
            double h = 0.0;
            for (int j = 0; j < sub_dim; ++j) {
                const float v = centroids[static_cast<std::size_t>(c) * sub_dim + j];
                cent_t[static_cast<std::size_t>(j) * k + c] = v;
                h += static_cast<double>(v) * v;
            }
            half[c] = static_cast<float>(0.5 * h);
        }
        bool changed = false;
        double objective = 0.0;
        for (int i = 0; i < n; ++i) {
            const int a = nearest_codeword(sub + static_cast<std::size_t>(i) * sub_dim,
                                           cent_t.data(), half.data(), k, sub_dim, &dist2[i]);
            changed = changed || a != assign[i];
            assign[i] = a;
            objective += dist2[i];
        }
        if (it == iterations || !changed || previous - objective < 1e-4 * previous) break;
        previous = objective;
        std::fill(sums.begin(), sums.end(), 0.0);
        std::fill(counts.begin(), counts.end(), 0);
        for (int i = 0; i < n; ++i) {
            ++counts[assign[i]];
            for (int j = 0; j < sub_dim; ++j)
                sums[static_cast<std::size_t>(assign[i]) * sub_dim + j] +=
                    sub[static_cast<std::size_t>(i) * sub_dim + j];
        }
        std::vector<int> far_order;
        for (int c = 0; c < k; ++c) {
            float* cc = centroids + static_cast<std::size_t>(c) * sub_dim;
            if (counts[c] > 0) {
                for (int j = 0; j < sub_dim; ++j)
                    cc[j] = static_cast<float>(sums[static_cast<std::size_t>(c) * sub_dim + j] /
                                               counts[c]);
                continue;
            }
            if (far_order.empty()) {  // points by decreasing distance to their centroid
                far_order.resize(n);
                for (int i = 0; i < n; ++i) far_order[i] = i;
                std::stable_sort(far_order.begin(), far_order.end(),
                                 [&](int a, int b) { return dist2[a] > dist2[b]; });
                far_order.resize(std::min(n, k));
                std::reverse(far_order.begin(), far_order.end());  // pop_back takes the farthest
            }
            const int i = far_order.back();
            far_order.pop_back();
            if (far_order.empty())
                far_order.push_back(i);  // out of points: reuse (harmless duplicate)
            std::copy_n(sub + static_cast<std::size_t>(i) * sub_dim, sub_dim, cc);
        }
    }
}

}  // namespace

VecInferGeometry vecinfer_geometry(int bits) {
    switch (bits) {
        case 1:
            return {8, 256};
        case 2:
            return {4, 256};
        case 3:
            return {2, 64};
        case 4:
            return {2, 256};
        default:
            break;
    }
    if (bits >= 5 && bits <= 8) return {1, 1 << bits};
    throw std::invalid_argument("calibrate_vecinfer: bits must be in 1..8, got " +
                                std::to_string(bits));
}

std::vector<float> vecinfer_smooth_factors(const HeadSamples& keys, const HeadSamples* queries,
                                           VecInferSmoothing smoothing) {
    if (smoothing == VecInferSmoothing::kNone) return std::vector<float>(keys.dim, 1.0f);
    std::vector<float> lambda = channel_absmax(keys);
    const bool balance = smoothing == VecInferSmoothing::kQueryBalanced && queries != nullptr &&
                         queries->count() > 0 && queries->dim == keys.dim;
    std::vector<float> qmax = balance ? channel_absmax(*queries) : std::vector<float>();
    for (int j = 0; j < keys.dim; ++j) {
        // Dividing key channel j by lambda_j and multiplying the query by it leaves q.k as is;
        // sqrt(max|K_j|) halves (in log scale) the spread of the key channel ranges.
        lambda[j] = balance ? std::sqrt(lambda[j] / qmax[j]) : std::sqrt(lambda[j]);
    }
    return lambda;
}

std::vector<float> train_product_codebook(const float* x, int n, int d, int sub_dim, int codewords,
                                          uint64_t seed,
                                          const VecInferCalibrationOptions& options) {
    if (sub_dim < 1 || d % sub_dim != 0)
        throw std::invalid_argument("train_product_codebook: sub_dim " + std::to_string(sub_dim) +
                                    " must divide d " + std::to_string(d));
    if (n < 1 || codewords < 1)
        throw std::invalid_argument("train_product_codebook: needs n, codewords >= 1");
    const int S = d / sub_dim;
    const int k = std::min(n, codewords);
    std::vector<float> codebook(static_cast<std::size_t>(d) * codewords);
    std::vector<float> sub(static_cast<std::size_t>(n) * sub_dim);
    std::vector<int> order(n);
    for (int s = 0; s < S; ++s) {
        for (int i = 0; i < n; ++i)
            std::copy_n(x + static_cast<std::size_t>(i) * d + s * sub_dim, sub_dim,
                        &sub[static_cast<std::size_t>(i) * sub_dim]);
        const uint64_t sseed = derive_seed(seed, s, 0, sub_dim, RandomPurpose::kKMeans);
        float* out = &codebook[static_cast<std::size_t>(s) * codewords * sub_dim];
        if (options.plus_plus_init) {
            KMeansOptions opt;  // seeding only; the iterations run in lloyd()
            opt.max_iterations = 0;
            opt.init = KMeansInit::kPlusPlus;
            const KMeansResult km = kmeans(sub.data(), n, sub_dim, k, sseed, opt);
            std::copy(km.centroids.begin(), km.centroids.end(), out);
        } else {
            // k distinct samples: the first k entries of a partial Fisher-Yates shuffle.
            Rng rng(sseed);
            for (int i = 0; i < n; ++i) order[i] = i;
            for (int c = 0; c < k; ++c) {
                std::swap(order[c],
                          order[c + static_cast<int>(rng.below(static_cast<uint64_t>(n - c)))]);
                std::copy_n(&sub[static_cast<std::size_t>(order[c]) * sub_dim], sub_dim,
                            out + static_cast<std::size_t>(c) * sub_dim);
            }
        }
        lloyd(sub.data(), n, sub_dim, k, out, options.kmeans_iterations);
        // Fewer samples than codewords: repeat centroids (ties go to the lower index, so the
        // copies are never chosen and cost nothing but table space).
        for (int c = k; c < codewords; ++c)
            std::copy_n(out + static_cast<std::size_t>(c % k) * sub_dim, sub_dim,
                        out + static_cast<std::size_t>(c) * sub_dim);
    }
    return codebook;
}

VecInferCalibration calibrate_vecinfer(const Activations& acts, int bits, uint64_t seed) {
    return calibrate_vecinfer(acts, bits, seed, VecInferCalibrationOptions{});
}

VecInferCalibration calibrate_vecinfer(const Activations& acts, int bits, uint64_t seed,
                                       const VecInferCalibrationOptions& options) {
    const VecInferGeometry g = vecinfer_geometry(bits);
    if (options.max_samples < 2 || options.kmeans_iterations < 0)
        throw std::invalid_argument(
            "calibrate_vecinfer: max_samples must be >= 2 and kmeans_iterations >= 0");
    const int L = static_cast<int>(acts.layers.size());
    if (L == 0) throw std::invalid_argument("calibrate_vecinfer: the activations have no layers");
    const int H = static_cast<int>(acts.layers[0].keys.size());
    if (H == 0) throw std::invalid_argument("calibrate_vecinfer: layer 0 has no KV heads");
    const int d = acts.layers[0].keys[0].dim;
    if (d < 1 || d % g.sub_dim != 0)
        throw std::invalid_argument("calibrate_vecinfer: head_dim " + std::to_string(d) +
                                    " is not a multiple of sub_dim " + std::to_string(g.sub_dim) +
                                    " (bits " + std::to_string(bits) + ")");
    for (int l = 0; l < L; ++l) {
        const auto& keys = acts.layers[l].keys;
        if (static_cast<int>(keys.size()) != H)
            throw std::invalid_argument("calibrate_vecinfer: layer " + std::to_string(l) + " has " +
                                        std::to_string(keys.size()) + " KV heads, layer 0 has " +
                                        std::to_string(H));
        for (int h = 0; h < H; ++h) {
            if (keys[h].dim != d)
                throw std::invalid_argument("calibrate_vecinfer: layer " + std::to_string(l) +
                                            " head " + std::to_string(h) + " has dim " +
                                            std::to_string(keys[h].dim) + ", layer 0 has " +
                                            std::to_string(d));
            if (keys[h].count() < 2)
                throw std::invalid_argument("calibrate_vecinfer: layer " + std::to_string(l) +
                                            " head " + std::to_string(h) + " has " +
                                            std::to_string(keys[h].count()) +
                                            " key samples; need at least 2");
        }
    }
    const int S = d / g.sub_dim;
    const std::size_t cb_block = static_cast<std::size_t>(d) * g.codewords;
    VecInferCalibration cal;
    cal.num_subspaces = S;
    cal.codebook.shape = {L, H, S, g.codewords, g.sub_dim};
    cal.codebook.data.resize(static_cast<std::size_t>(L) * H * cb_block);
    cal.smooth_factors.shape = {L, H, d};
    cal.smooth_factors.data.resize(static_cast<std::size_t>(L) * H * d);
    // One task per (layer, head); k-means inside runs on this task's thread (no nested teams).
    ParallelErrors errors;
#pragma omp parallel for schedule(dynamic)
    for (int task = 0; task < L * H; ++task) {
        errors.run(task, [&] {
            const int l = task / H, h = task % H;
            const LayerActivations& la = acts.layers[l];
            const HeadSamples* q =
                h < static_cast<int>(la.queries.size()) ? &la.queries[h] : nullptr;
            const std::vector<float> lambda =
                vecinfer_smooth_factors(la.keys[h], q, options.smoothing);
            int n = 0;
            const std::vector<float> x = transformed_rows(
                la.keys[h], lambda, vecinfer_rotation(d, l, h), options.max_samples, &n);
            const std::vector<float> cb =
                train_product_codebook(x.data(), n, d, g.sub_dim, g.codewords,
                                       derive_seed(seed, l, h, d, RandomPurpose::kKMeans), options);
            std::copy(cb.begin(), cb.end(), cal.codebook.data.begin() + task * cb_block);
            std::copy(lambda.begin(), lambda.end(),
                      cal.smooth_factors.data.begin() + static_cast<std::size_t>(task) * d);
        });
    }
    errors.rethrow();
    return cal;
}

}  // namespace veloxquant
