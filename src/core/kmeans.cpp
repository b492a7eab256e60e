#include "core/kmeans.h"

#include <algorithm>
#include <cstddef>
#include <numeric>
#include <stdexcept>
#include <string>

#include "core/cpu_isa.h"
#include "core/rng.h"
#include "core/x86_intrinsics.h"

namespace veloxquant {
namespace {

#ifdef VQ_X86_KERNELS
// squared_distance's eight partial sums as the lanes of one 256-bit vector: the same differences,
// products and adds in the same order (separate multiply and add, no FMA); then the tail and the
// lanes, added in order. C centroids at once keep C independent add chains in flight.
template <int C>
__attribute__((target("avx2"))) inline void distances_avx2(const float* x, const float* first,
                                                           int d, float* out) {
    const int body = d / 8 * 8;
    __m256 part[C];
    for (int c = 0; c < C; ++c) part[c] = _mm256_setzero_ps();
    for (int j = 0; j < body; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j);
        for (int c = 0; c < C; ++c) {
            const __m256 t =
                _mm256_sub_ps(a, _mm256_loadu_ps(first + static_cast<std::size_t>(c) * d + j));
            part[c] = _mm256_add_ps(part[c], _mm256_mul_ps(t, t));
        }
    }
    for (int c = 0; c < C; ++c) {
        const float* b = first + static_cast<std::size_t>(c) * d;
        float acc = 0.0f;
        for (int j = body; j < d; ++j) {
            const float t = x[j] - b[j];
            acc += t * t;
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, part[c]);
        for (int l = 0; l < 8; ++l) acc += lanes[l];
        out[c] = acc;
    }
}

__attribute__((target("avx2"))) int nearest_avx2(const float* x, const float* centroids,
                                                 const float*, int, int k, int d, float* dist2) {
    int best = 0;
    float best_d = 0.0f, dd[8];
    for (int c0 = 0; c0 < k;) {
        const int count = k - c0 >= 8 ? 8 : 1;
        const float* first = centroids + static_cast<std::size_t>(c0) * d;
        if (count == 8)
            distances_avx2<8>(x, first, d, dd);
        else
            distances_avx2<1>(x, first, d, dd);
        for (int c = 0; c < count; ++c, ++c0)
            if (c0 == 0 || dd[c] < best_d) {
                best_d = dd[c];
                best = c0;
            }
    }
    if (dist2) *dist2 = best_d;
    return best;
}

// 16 centroids a register from the transposed table t ([d][stride]): part[l] holds partial sum l
// (coordinates j = 8 i + l) of each, then the tail and the partials are added in order, as
// squared_distance does. The difference is taken as c - x, whose square is (x - c)^2 exactly
// (rounding is symmetric), so that x_j can be a broadcast operand. The empty asm keeps GCC,
// which may contract intrinsics under this target, from fusing the multiply into the add.
__attribute__((target("avx512f"))) int nearest_avx512(const float* x, const float*, const float* t,
                                                      int stride, int k, int d, float* dist2) {
    const int body = d / 8 * 8;
    int best = 0;
    float best_d = 0.0f;
    alignas(64) float dd[16];
    for (int c0 = 0; c0 < k; c0 += 16) {
        const float* col = t + c0;
        __m512 part[8];
        for (int l = 0; l < 8; ++l) part[l] = _mm512_setzero_ps();
        for (int j = 0; j < body; j += 8)
            for (int l = 0; l < 8; ++l) {
                const __m512 diff =
                    _mm512_sub_ps(_mm512_loadu_ps(col + static_cast<std::size_t>(j + l) * stride),
                                  _mm512_set1_ps(x[j + l]));
                __m512 sq = _mm512_mul_ps(diff, diff);
                asm("" : "+v"(sq));
                part[l] = _mm512_add_ps(part[l], sq);
            }
        __m512 acc = _mm512_setzero_ps();
        for (int j = body; j < d; ++j) {
            const __m512 diff = _mm512_sub_ps(
                _mm512_loadu_ps(col + static_cast<std::size_t>(j) * stride), _mm512_set1_ps(x[j]));
            __m512 sq = _mm512_mul_ps(diff, diff);
            asm("" : "+v"(sq));
            acc = _mm512_add_ps(acc, sq);
        }
        for (int l = 0; l < 8; ++l) acc = _mm512_add_ps(acc, part[l]);
        _mm512_store_ps(dd, acc);
        for (int c = c0; c < k && c < c0 + 16; ++c)
            if (c == 0 || dd[c - c0] < best_d) {
                best_d = dd[c - c0];
                best = c;
            }
    }
    if (dist2) *dist2 = best_d;
    return best;
}
#endif

int nearest_generic(const float* x, const float* centroids, const float*, int, int k, int d,
                    float* dist2) {
    return nearest_centroid(x, centroids, k, d, dist2);
}

// Below this many multiply-adds a loop runs on one thread: waking a team costs more.
constexpr long kParallelWork = 1L << 17;

bool worth_threads(int n, int d, int k) {
    return static_cast<long>(n) * d * k >= kParallelWork;
}

const float* row(const float* base, int i, int d) {
    return base + static_cast<std::size_t>(i) * static_cast<std::size_t>(d);
}

// Sums in index order, so the total does not depend on how the terms were computed.
double ordered_sum(const std::vector<float>& v) {
    double s = 0.0;
    for (float x : v) s += x;
    return s;
}

// Points seeding the k centroids.
std::vector<int> initial_points(const float* data, int n, int d, int k, KMeansInit init, Rng& rng) {
    std::vector<int> chosen;
    chosen.reserve(k);
    if (init == KMeansInit::kRandomDistinct) {
        // Partial Fisher-Yates shuffle: the first k entries are k distinct uniform picks.
        std::vector<int> idx(n);
        std::iota(idx.begin(), idx.end(), 0);
        for (int i = 0; i < k; ++i) {
            const int j = i + static_cast<int>(rng.below(static_cast<uint64_t>(n - i)));
            std::swap(idx[i], idx[j]);
            chosen.push_back(idx[i]);
        }
        return chosen;
    }
    // k-means++: each next seed is drawn with probability proportional to its squared
    // distance to the nearest seed so far.
    std::vector<char> taken(n, 0);
    std::vector<float> dist2(n);
    int next = static_cast<int>(rng.below(static_cast<uint64_t>(n)));
    for (int c = 0; c < k; ++c) {
        chosen.push_back(next);
        taken[next] = 1;
        if (c + 1 == k) break;
        const float* seed_point = row(data, next, d);
#pragma omp parallel for schedule(static) if (worth_threads(n, d, 1))
        for (int i = 0; i < n; ++i) {
            const float dd = squared_distance(row(data, i, d), seed_point, d);
            dist2[i] = (c == 0) ? dd : std::min(dist2[i], dd);
        }
        const double total = ordered_sum(dist2);
        next = -1;
        if (total > 0.0) {
            const double r = rng.uniform() * total;
            double cum = 0.0;
            for (int i = 0; i < n; ++i) {
                if (dist2[i] <= 0.0f) continue;
                cum += dist2[i];
                next = i;  // the last positive point absorbs rounding at the top end
                if (cum > r) break;
            }
        }
        if (next < 0) {
            // Every point coincides with a seed: take a uniformly drawn index not yet used.
            const int free_count = n - (c + 1);
            int pick = static_cast<int>(rng.below(static_cast<uint64_t>(free_count)));
            for (int i = 0; i < n; ++i) {
                if (taken[i]) continue;
                if (pick-- == 0) {
                    next = i;
                    break;
                }
            }
        }
    }
    return chosen;
}

void assign_all(const float* data, int n, int d, const std::vector<float>& centroids, int k,
                std::vector<int>& assignment, std::vector<float>& dist2) {
    const CentroidSearch search(centroids.data(), k, d);
#pragma omp parallel for schedule(static) if (worth_threads(n, d, k))
    for (int i = 0; i < n; ++i) assignment[i] = search.nearest(row(data, i, d), &dist2[i]);
}

// Moves each empty cluster's centroid onto the point farthest from its own centroid (ties to
// the lower index), using each point at most once. Returns whether anything moved.
bool reseed_empty(const float* data, int n, int d, int k, const std::vector<int>& counts,
                  const std::vector<int>& assignment, std::vector<float>& centroids) {
    std::vector<int> empty;
    for (int c = 0; c < k; ++c)
        if (counts[c] == 0) empty.push_back(c);
    if (empty.empty()) return false;
    std::vector<float> far(n);
#pragma omp parallel for schedule(static) if (worth_threads(n, d, 1))
    for (int i = 0; i < n; ++i)
        far[i] = squared_distance(row(data, i, d), row(centroids.data(), assignment[i], d), d);
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return far[a] > far[b]; });
    bool moved = false;
    for (std::size_t e = 0; e < empty.size() && e < order.size(); ++e) {
        const int i = order[e];
        if (far[i] <= 0.0f) break;  // every point sits on its centroid: nothing to split
        std::copy_n(row(data, i, d), d, &centroids[static_cast<std::size_t>(empty[e]) * d]);
        moved = true;
    }
    return moved;
}

}  // namespace

CentroidSearch::CentroidSearch(const float* centroids, int k, int d)
    : centroids_(centroids), k_(k), d_(d) {
#ifdef VQ_X86_KERNELS
    kernel_ = kernel_for_isa<decltype(kernel_)>(nearest_generic, nearest_avx2, nearest_avx512);
    if (kernel_ == nearest_avx512) {
        stride_ = (k + 15) / 16 * 16;
        transposed_.assign(static_cast<std::size_t>(d) * stride_, 0.0f);
        for (int c = 0; c < k; ++c)
            for (int j = 0; j < d; ++j)
                transposed_[static_cast<std::size_t>(j) * stride_ + c] =
                    centroids[static_cast<std::size_t>(c) * d + j];
    }
#else
    kernel_ = nearest_generic;
#endif
}

int CentroidSearch::nearest(const float* x, float* dist2) const {
    return kernel_(x, centroids_, transposed_.data(), stride_, k_, d_, dist2);
}

KMeansResult kmeans(const float* data, int n, int d, int k, uint64_t seed,
                    const KMeansOptions& options) {
    if (n < 1 || d < 1 || k < 1)
        throw std::invalid_argument("kmeans needs n, d, k >= 1, got n=" + std::to_string(n) +
                                    " d=" + std::to_string(d) + " k=" + std::to_string(k));
    if (options.max_iterations < 0 || !(options.tolerance >= 0.0))
        throw std::invalid_argument("kmeans: max_iterations and tolerance must be >= 0");

    KMeansResult res;
    res.k = std::min(k, n);
    const std::size_t dd = static_cast<std::size_t>(d);
    Rng rng(seed);
    res.centroids.resize(static_cast<std::size_t>(res.k) * dd);
    const std::vector<int> seeds = initial_points(data, n, d, res.k, options.init, rng);
    for (int c = 0; c < res.k; ++c) std::copy_n(row(data, seeds[c], d), d, &res.centroids[c * dd]);

    res.assignment.assign(n, 0);
    std::vector<float> dist2(n);
    assign_all(data, n, d, res.centroids, res.k, res.assignment, dist2);
    res.objective_history.push_back(ordered_sum(dist2));

    std::vector<double> sums(static_cast<std::size_t>(res.k) * dd);
    std::vector<int> counts(res.k);
    std::vector<int> previous;
    for (int it = 0; it < options.max_iterations && res.objective() > 0.0; ++it) {
        // Update step: centroid = mean of its points (accumulated in point order).
        std::fill(sums.begin(), sums.end(), 0.0);
        std::fill(counts.begin(), counts.end(), 0);
        for (int i = 0; i < n; ++i) {
            const int c = res.assignment[i];
            ++counts[c];
            const float* x = row(data, i, d);
            double* s = &sums[c * dd];
            for (int j = 0; j < d; ++j) s[j] += x[j];
        }
        for (int c = 0; c < res.k; ++c) {
            if (counts[c] == 0) continue;
            for (int j = 0; j < d; ++j)
                res.centroids[c * dd + j] = static_cast<float>(sums[c * dd + j] / counts[c]);
        }
        const bool reseeded =
            reseed_empty(data, n, d, res.k, counts, res.assignment, res.centroids);

        previous = res.assignment;
        assign_all(data, n, d, res.centroids, res.k, res.assignment, dist2);
        const double before = res.objective();
        res.objective_history.push_back(ordered_sum(dist2));
        if (!reseeded && previous == res.assignment) break;
        if (!reseeded && before - res.objective() < options.tolerance * before) break;
    }
    return res;
}

}  // namespace veloxquant
