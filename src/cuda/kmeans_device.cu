#include "cuda/kmeans_device.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "core/rng.h"
#include "cuda/cuda_cache.h"
#include "cuda/exact_running_sum.cuh"
#include "cuda/rabitq_nearest.cuh"

namespace veloxquant::cuda {
namespace {

/// One set's progress, read and written by the kernels of its iterations.
struct SetState {
    int active;   ///< 1 while the CPU's loop would go on
    int host;     ///< 1: this set takes a path only the host runs (kmeans() redoes it there)
    int changed;  ///< an assignment moved in the current iteration
    int history;  ///< objective values recorded
};

constexpr int kSeedThreads = 1024;         // seed_draw: the staging and the drawn point's search
constexpr int kSeedDistanceThreads = 256;  // 32 points a CTA
constexpr int kObjectiveThreads = 256;
// 64 points a CTA, four a warp: 32 warps an SM at two CTAs (its 56 registers a thread allow it).
constexpr int kAssignWarps = 16, kAssignPointsPerWarp = 4;
constexpr int kUpdateThreads = 256;
// Clusters a CTA of the update covers: kUpdateThreads consecutive (centroid, coordinate) pairs
// span at most kUpdateThreads / d + 2 of them (d >= 8).
constexpr int kUpdateMaxClusters = kUpdateThreads / 8 + 2;

// sum += x[0..n) in index order, in double (the CPU's ordered_sum), writing each partial sum to
// running[i] where given. Loads go ahead of the dependent adds, eight at a time.
__device__ double ordered_sum(const float* __restrict__ x, int n, double* __restrict__ running) {
    double sum = 0.0;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        float v[8];
#pragma unroll
        for (int l = 0; l < 8; ++l) v[l] = x[i + l];
#pragma unroll
        for (int l = 0; l < 8; ++l) {
            sum += v[l];
            if (running) running[i + l] = sum;
        }
    }
    for (; i < n; ++i) {
        sum += x[i];
        if (running) running[i] = sum;
    }
    return sum;
}

// squared_distance(row, seed, d) for d a multiple of 8 by eight lanes: lane l of the group adds
// partial sum l (coordinates l, l + 8, ...) in the CPU's order, and the group's first lane adds
// the eight partials in order. Valid in the group's first lane.
__device__ float group_distance(const float* row, const float* seed, int d, int l) {
    float part = 0.0f;
    int j = l;
    for (; j + 24 < d; j += 32) {  // four loads ahead of their adds, which stay in j order
        const float a0 = row[j], a1 = row[j + 8], a2 = row[j + 16], a3 = row[j + 24];
        const float t0 = a0 - seed[j], t1 = a1 - seed[j + 8], t2 = a2 - seed[j + 16],
                    t3 = a3 - seed[j + 24];
        part += t0 * t0;
        part += t1 * t1;
        part += t2 * t2;
        part += t3 * t3;
    }
    for (; j < d; j += 8) {
        const float t = row[j] - seed[j];
        part += t * t;
    }
    float parts[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) parts[q] = __shfl_sync(kFull, part, (threadIdx.x & 24) + q);
    float acc = 0.0f;
#pragma unroll
    for (int q = 0; q < 8; ++q) acc += parts[q];
    return acc;
}

// k-means++ seeding (kmeans.cpp's initial_points), d a multiple of 8, round by round in two
// kernels, so that a round's distances spread over many CTAs and its sum over one.
// Round c, seed_distances: seed c is point next[set] (its row becomes centroid c); every point's
// squared distance to it (eight lanes a point) folded into its distance to the nearest seed so
// far. seed_draw: their running double sums in index order, the partial sums of the CPU's
// ordered_sum and of its sampling scan (which adds the same terms but the zeros, and adding 0.0
// leaves a double unchanged): by the CTA where none rounds (exact_running_sum.cuh), else by one
// thread; then the drawn point, next[set]: the first with a positive distance whose running sum
// passes u_c * total, else the last with a positive distance.
__global__ void seed_distances(const float* points, int n, int d, int k, int c, const int* next,
                               float* centroids, float* dist2, const SetState* states) {
    const int set = blockIdx.y, t = threadIdx.x;
    if (!states[set].active) return;
    const float* p = points + static_cast<std::size_t>(set) * n * d;
    const float* seed = p + static_cast<std::size_t>(next[set]) * d;
    if (blockIdx.x == 0)
        for (int j = t; j < d; j += blockDim.x)
            centroids[(static_cast<std::size_t>(set) * k + c) * d + j] = seed[j];
    if (c + 1 == k) return;
    // Eight lanes a point; every lane of a warp takes part in the shuffles.
    const int i = blockIdx.x * (blockDim.x / 8) + t / 8;
    const float dd =
        group_distance(p + static_cast<std::size_t>(i < n ? i : 0) * d, seed, d, t & 7);
    float* near = dist2 + static_cast<std::size_t>(set) * n;
    if ((t & 7) == 0 && i < n) near[i] = (c == 0 || dd < near[i]) ? dd : near[i];
}

// Dynamic shared memory: running sums [n] doubles, the set's distances [n] floats.
__global__ void __launch_bounds__(kSeedThreads)
    seed_draw(int n, int k, int c, const double* uniforms, const float* dist2, int* next,
              SetState* states) {
    extern __shared__ double running[];
    float* near = reinterpret_cast<float*>(running + n);
    __shared__ int drawn, last_positive, empty_round;
    __shared__ double draw;
    const int set = blockIdx.x, t = threadIdx.x;
    if (!states[set].active) return;
    for (int i = t; i < n; i += blockDim.x) near[i] = dist2[static_cast<std::size_t>(set) * n + i];
    if (t == 0) {
        drawn = n;
        last_positive = -1;
    }
    __syncthreads();
    double sum = 0.0;
    const bool exact = exact_running_sums<kSeedThreads>(near, n, running, &sum);
    if (t == 0) {
        if (!exact) sum = ordered_sum(near, n, running);
        empty_round = !(sum > 0.0);
        draw = uniforms[static_cast<std::size_t>(set) * (k - 1) + c] * sum;
    }
    __syncthreads();
    if (empty_round) {  // every point sits on a seed: the CPU draws an index instead
        if (t == 0) {
            states[set].host = 1;
            states[set].active = 0;
        }
        return;
    }
    const double r = draw;
    int my_drawn = n, my_last = -1;
    for (int i = t; i < n; i += blockDim.x) {
        if (!(near[i] > 0.0f)) continue;
        my_last = i;
        if (my_drawn == n && running[i] > r) my_drawn = i;
    }
    if (my_drawn < n) atomicMin(&drawn, my_drawn);
    if (my_last >= 0) atomicMax(&last_positive, my_last);
    __syncthreads();
    if (t == 0) next[set] = drawn < n ? drawn : last_positive;
}

// Assignment (kmeans.cpp's assign_all): a warp a point, each lane scoring its centroids
// (codec::rb_nearest, the rabitq encoder's search: squared_distance's sums, the lowest index
// among equals). The CTA's points and the set's centroids are staged in shared memory, the
// centroids in rows of d + kRbRowPad floats, so that the search's loads do not wait on global
// memory; the winner's distance again by squared_distance. `track`: note whether any point
// changed centroid (the CPU's previous == assignment).
// Dynamic shared memory: the CTA's points [kAssignWarps * kAssignPointsPerWarp][d], then the rows.
__global__ void __launch_bounds__(kAssignWarps * 32)
    assign_points(const float* points, int n, int d, int k, const float* centroids, int* assignment,
                  float* dist2, SetState* states, int track) {
    constexpr int kCtaPoints = kAssignWarps * kAssignPointsPerWarp;
    extern __shared__ float4 staged[];
    float* xs = reinterpret_cast<float*>(staged);
    float* rows = xs + kCtaPoints * d;
    const int set = blockIdx.y, stride = d + codec::kRbRowPad;
    if (!states[set].active) return;
    const float* src = centroids + static_cast<std::size_t>(set) * k * d;
    for (int t = threadIdx.x; t < k * d; t += blockDim.x) rows[t / d * stride + t % d] = src[t];
    const int first = blockIdx.x * kCtaPoints, count = min(kCtaPoints, n - first);
    const float4* from =
        reinterpret_cast<const float4*>(points + (static_cast<std::size_t>(set) * n + first) * d);
    for (int t = threadIdx.x; t < count * d / 4; t += blockDim.x) staged[t] = from[t];
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int i0 = first + warp * kAssignPointsPerWarp;
    for (int i = i0; i < i0 + kAssignPointsPerWarp && i < n; ++i) {
        const std::size_t at = static_cast<std::size_t>(set) * n + i;
        const float* x = xs + static_cast<std::size_t>(i - first) * d;
        const int a = codec::rb_nearest(x, rows, stride, k, d, lane);
        if (lane == 0) {
            if (track && a != assignment[at]) states[set].changed = 1;
            assignment[at] = a;
            dist2[at] = squared_distance(x, rows + static_cast<std::size_t>(a) * stride, d);
        }
    }
}

// The objective (the CPU's ordered_sum of dist2: the set's dist2 staged in shared memory, then
// summed by the CTA where no partial sum rounds, else by one thread) and the CPU's loop tests:
// `first` after the seeding's assignment (the loop runs while iterations remain and the objective
// is positive), otherwise after an iteration (stop once nothing moved, once the objective fell by
// less than tolerance * objective, or at the iteration cap).
__global__ void record_objective(const float* dist2, int n, SetState* states, double* history,
                                 int max_iterations, double tolerance, int first) {
    extern __shared__ float staged_dist2[];
    const int set = blockIdx.x;
    SetState& st = states[set];
    if (!st.active) return;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        staged_dist2[i] = dist2[static_cast<std::size_t>(set) * n + i];
    __syncthreads();
    double sum = 0.0;
    const bool exact = exact_running_sums<kObjectiveThreads>(staged_dist2, n, nullptr, &sum);
    if (threadIdx.x != 0) return;
    if (!exact) sum = ordered_sum(staged_dist2, n, nullptr);
    double* h = history + static_cast<std::size_t>(set) * (max_iterations + 1);
    const int count = st.history;
    h[count] = sum;
    st.history = count + 1;
    if (first) {
        st.active = max_iterations > 0 && sum > 0.0;
        return;
    }
    const double before = h[count - 1];
    const bool stop =
        !st.changed || before - sum < tolerance * before || count >= max_iterations || !(sum > 0.0);
    st.active = !stop;
    st.changed = 0;
}

// Update (centroid = mean of its points): a thread a (centroid, coordinate), summing its
// cluster's points in point order in double as the CPU does. The CTA first lists the members of
// its clusters in point order (a warp a cluster: ballots over the set's assignment, staged in
// shared memory), so a thread reads its own points only, not all n. An empty cluster hands the
// set to the host (the CPU re-seeds it from the points farthest from their centroids).
// Dynamic shared memory: the assignment [n] ints, then the CTA's clusters' members [n] ints.
__global__ void __launch_bounds__(kUpdateThreads)
    update_centroids(const float* points, int n, int d, int k, const int* assignment,
                     float* centroids, SetState* states) {
    extern __shared__ int owner[];
    int* members = owner + n;
    __shared__ int count[kUpdateMaxClusters], start[kUpdateMaxClusters];
    const int set = blockIdx.y;
    if (!states[set].active) return;
    const int* a = assignment + static_cast<std::size_t>(set) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) owner[i] = a[i];
    __syncthreads();
    const int first = blockIdx.x * blockDim.x, c_lo = first / d;
    const int clusters = min(k - 1, (first + blockDim.x - 1) / d) - c_lo + 1;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const unsigned below = (1u << lane) - 1;
    for (int g = warp; g < clusters; g += warps) {
        int found = 0;
        for (int i0 = 0; i0 < n; i0 += 32)
            found += __popc(__ballot_sync(kFull, i0 + lane < n && owner[i0 + lane] == c_lo + g));
        if (lane == 0) count[g] = found;
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int g = 0, at = 0; g < clusters; at += count[g++]) start[g] = at;
    __syncthreads();
    for (int g = warp; g < clusters; g += warps) {
        int at = start[g];
        for (int i0 = 0; i0 < n; i0 += 32) {
            const bool mine = i0 + lane < n && owner[i0 + lane] == c_lo + g;
            const unsigned ballot = __ballot_sync(kFull, mine);
            if (mine) members[at + __popc(ballot & below)] = i0 + lane;
            at += __popc(ballot);
        }
    }
    __syncthreads();
    const int t = first + threadIdx.x;
    if (t >= k * d) return;
    const int c = t / d, j = t % d, g = c - c_lo;
    if (count[g] == 0) {
        states[set].host = 1;
        states[set].active = 0;
        return;
    }
    const float* p = points + static_cast<std::size_t>(set) * n * d + j;
    double sum = 0.0;
    for (int m = start[g]; m < start[g] + count[g]; ++m)
        sum += p[static_cast<std::size_t>(members[m]) * d];
    centroids[(static_cast<std::size_t>(set) * k + c) * d + j] = static_cast<float>(sum / count[g]);
}

/// Bytes of shared memory a kernel may take on this device (the opt-in limit), and the
/// attribute set so that it can.
bool allow_shared(const void* kernel, std::size_t bytes) {
    int device = 0, optin = 0;
    check_cuda(cudaGetDevice(&device), "kmeans: device");
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "kmeans: shared memory limit");
    if (bytes > static_cast<std::size_t>(optin)) return false;
    if (bytes > 48 * 1024)
        check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)),
                   "kmeans: shared memory");
    return true;
}

/// One stream-ordered allocation carved into the buffers, given back on every exit.
class DeviceArena {
public:
    DeviceArena(std::size_t bytes, cudaStream_t stream) : stream_(stream) {
        check_cuda(cudaMallocAsync(&base_, bytes, stream), "kmeans: device memory");
    }
    ~DeviceArena() { cudaFreeAsync(base_, stream_); }
    DeviceArena(const DeviceArena&) = delete;
    DeviceArena& operator=(const DeviceArena&) = delete;
    template <class T>
    T* take(std::size_t count) {
        used_ = padded(used_);
        T* at = reinterpret_cast<T*>(static_cast<char*>(base_) + used_);
        used_ += count * sizeof(T);
        return at;
    }
    static std::size_t padded(std::size_t bytes) { return (bytes + 15) / 16 * 16; }

private:
    void* base_ = nullptr;
    std::size_t used_ = 0;
    cudaStream_t stream_;
};

/// kmeans_on_device with the points on the host (points), or on the device (device_points).
std::vector<KMeansResult> kmeans_sets(const float* points, const float* device_points, int sets,
                                      int n, int d, int k, const uint64_t* seeds,
                                      const KMeansOptions& options, cudaStream_t stream,
                                      int* host_runs) {
    if (sets < 0) throw std::invalid_argument("kmeans_on_device: sets must be >= 0");
    if (n < 1 || d < 1 || k < 1 || options.max_iterations < 0 || !(options.tolerance >= 0.0))
        return {kmeans(points, n, d, k, sets > 0 ? seeds[0] : 0, options)};  // throws first
    const int kk = std::min(k, n);
    const std::size_t set_floats = static_cast<std::size_t>(n) * d;
    std::vector<KMeansResult> results(sets);
    std::vector<char> on_host(sets, 1);
    auto finish_on_host = [&] {
        int runs = 0;
        std::vector<float> copied;
        for (int s = 0; s < sets; ++s) {
            if (!on_host[s]) continue;
            const float* set_points = points != nullptr ? points + s * set_floats : nullptr;
            if (set_points == nullptr) {
                copied.resize(set_floats);
                check_cuda(
                    cudaMemcpyAsync(copied.data(), device_points + s * set_floats,
                                    set_floats * sizeof(float), cudaMemcpyDeviceToHost, stream),
                    "kmeans: copy a set's points to the host");
                check_cuda(cudaStreamSynchronize(stream), "kmeans: synchronize");
                set_points = copied.data();
            }
            results[s] = kmeans(set_points, n, d, k, seeds[s], options);
            ++runs;
        }
        if (host_runs) *host_runs = runs;
        return results;
    };
    // The seeding draw's shared memory: running sums [n] doubles, dist2 [n] floats; the
    // assignment's: its points and the centroids' padded rows; the update's: the assignment and its
    // clusters' members, [n] ints each; the objective's: dist2 [n].
    const std::size_t seed_shared = static_cast<std::size_t>(n) * (sizeof(double) + sizeof(float));
    const std::size_t assign_shared =
        (static_cast<std::size_t>(kAssignWarps) * kAssignPointsPerWarp * d +
         static_cast<std::size_t>(kk) * (d + codec::kRbRowPad)) *
        sizeof(float);
    const std::size_t update_shared = 2 * static_cast<std::size_t>(n) * sizeof(int);
    const std::size_t objective_shared = static_cast<std::size_t>(n) * sizeof(float);
    if (sets == 0 || options.init != KMeansInit::kPlusPlus || d % 8 != 0 ||
        reinterpret_cast<std::uintptr_t>(device_points) % 16 != 0 ||  // float4 staging
        !allow_shared(reinterpret_cast<const void*>(seed_draw), seed_shared) ||
        !allow_shared(reinterpret_cast<const void*>(assign_points), assign_shared) ||
        !allow_shared(reinterpret_cast<const void*>(update_centroids), update_shared) ||
        !allow_shared(reinterpret_cast<const void*>(record_objective), objective_shared))
        return finish_on_host();

    // The CPU's draws, as kmeans() makes them while no seeding round is empty: the first seed's
    // index, then one uniform a round.
    std::vector<int> first(sets);
    std::vector<double> uniforms(static_cast<std::size_t>(sets) * std::max(kk - 1, 1));
    for (int s = 0; s < sets; ++s) {
        Rng rng(seeds[s]);
        first[s] = static_cast<int>(rng.below(static_cast<uint64_t>(n)));
        for (int c = 0; c + 1 < kk; ++c)
            uniforms[static_cast<std::size_t>(s) * (kk - 1) + c] = rng.uniform();
    }
    const int history_len = options.max_iterations + 1;
    const std::size_t all_points = set_floats * sets;
    const std::size_t all_centroids = static_cast<std::size_t>(sets) * kk * d;
    const std::size_t all_rows = static_cast<std::size_t>(sets) * n;
    using P = DeviceArena;
    DeviceArena arena(P::padded(device_points ? 0 : all_points * 4) + P::padded(all_centroids * 4) +
                          P::padded(all_rows * 4) * 2 + P::padded(sets * sizeof(SetState)) +
                          P::padded(static_cast<std::size_t>(sets) * history_len * 8) +
                          P::padded(sets * 4) + P::padded(uniforms.size() * 8),
                      stream);
    float* uploaded = arena.take<float>(device_points ? 0 : all_points);
    const float* d_points = device_points ? device_points : uploaded;
    float* d_centroids = arena.take<float>(all_centroids);
    int* d_assignment = arena.take<int>(all_rows);
    float* d_dist2 = arena.take<float>(all_rows);
    SetState* d_states = arena.take<SetState>(sets);
    double* d_history = arena.take<double>(static_cast<std::size_t>(sets) * history_len);
    int* d_next = arena.take<int>(sets);  // the seed each round takes, the first drawn here
    double* d_uniforms = arena.take<double>(uniforms.size());
    const std::vector<SetState> start(sets, SetState{1, 0, 0, 0});
    if (!device_points)
        check_cuda(
            cudaMemcpyAsync(uploaded, points, all_points * 4, cudaMemcpyHostToDevice, stream),
            "kmeans: copy points");
    check_cuda(cudaMemcpyAsync(d_states, start.data(), sets * sizeof(SetState),
                               cudaMemcpyHostToDevice, stream),
               "kmeans: copy states");
    check_cuda(cudaMemcpyAsync(d_next, first.data(), sets * 4, cudaMemcpyHostToDevice, stream),
               "kmeans: copy draws");
    check_cuda(cudaMemcpyAsync(d_uniforms, uniforms.data(), uniforms.size() * 8,
                               cudaMemcpyHostToDevice, stream),
               "kmeans: copy draws");

    const int assign_points_per_cta = kAssignWarps * kAssignPointsPerWarp;
    const dim3 assign_grid((n + assign_points_per_cta - 1) / assign_points_per_cta, sets);
    const dim3 update_grid((kk * d + kUpdateThreads - 1) / kUpdateThreads, sets);
    const dim3 seed_grid((n + kSeedDistanceThreads / 8 - 1) / (kSeedDistanceThreads / 8), sets);
    for (int c = 0; c < kk; ++c) {
        seed_distances<<<seed_grid, kSeedDistanceThreads, 0, stream>>>(
            d_points, n, d, kk, c, d_next, d_centroids, d_dist2, d_states);
        if (c + 1 < kk)
            seed_draw<<<sets, kSeedThreads, seed_shared, stream>>>(n, kk, c, d_uniforms, d_dist2,
                                                                   d_next, d_states);
    }
    assign_points<<<assign_grid, kAssignWarps * 32, assign_shared, stream>>>(
        d_points, n, d, kk, d_centroids, d_assignment, d_dist2, d_states, 0);
    record_objective<<<sets, kObjectiveThreads, objective_shared, stream>>>(
        d_dist2, n, d_states, d_history, options.max_iterations, options.tolerance, 1);
    // Every iteration is launched; a set whose loop has ended skips them (a few microseconds
    // each) rather than the host waiting on the device after each.
    for (int it = 0; it < options.max_iterations; ++it) {
        update_centroids<<<update_grid, kUpdateThreads, update_shared, stream>>>(
            d_points, n, d, kk, d_assignment, d_centroids, d_states);
        assign_points<<<assign_grid, kAssignWarps * 32, assign_shared, stream>>>(
            d_points, n, d, kk, d_centroids, d_assignment, d_dist2, d_states, 1);
        record_objective<<<sets, kObjectiveThreads, objective_shared, stream>>>(
            d_dist2, n, d_states, d_history, options.max_iterations, options.tolerance, 0);
    }
    check_cuda(cudaGetLastError(), "kmeans: launch");

    std::vector<SetState> states(sets);
    std::vector<double> history(static_cast<std::size_t>(sets) * history_len);
    std::vector<float> centroids(all_centroids);
    std::vector<int> assignment(all_rows);
    check_cuda(cudaMemcpyAsync(states.data(), d_states, sets * sizeof(SetState),
                               cudaMemcpyDeviceToHost, stream),
               "kmeans: copy results");
    check_cuda(cudaMemcpyAsync(history.data(), d_history, history.size() * 8,
                               cudaMemcpyDeviceToHost, stream),
               "kmeans: copy results");
    check_cuda(cudaMemcpyAsync(centroids.data(), d_centroids, all_centroids * 4,
                               cudaMemcpyDeviceToHost, stream),
               "kmeans: copy results");
    check_cuda(cudaMemcpyAsync(assignment.data(), d_assignment, all_rows * 4,
                               cudaMemcpyDeviceToHost, stream),
               "kmeans: copy results");
    check_cuda(cudaStreamSynchronize(stream), "kmeans: synchronize");

    for (int s = 0; s < sets; ++s) {
        if (states[s].host) continue;
        on_host[s] = 0;
        KMeansResult& r = results[s];
        r.k = kk;
        const std::size_t per = static_cast<std::size_t>(kk) * d;
        r.centroids.assign(centroids.begin() + s * per, centroids.begin() + (s + 1) * per);
        r.assignment.assign(assignment.begin() + static_cast<std::size_t>(s) * n,
                            assignment.begin() + static_cast<std::size_t>(s + 1) * n);
        const double* h = history.data() + static_cast<std::size_t>(s) * history_len;
        r.objective_history.assign(h, h + states[s].history);
    }
    return finish_on_host();
}

}  // namespace

std::vector<KMeansResult> kmeans_on_device(const float* points, int sets, int n, int d, int k,
                                           const uint64_t* seeds, const KMeansOptions& options,
                                           cudaStream_t stream, int* host_runs) {
    return kmeans_sets(points, nullptr, sets, n, d, k, seeds, options, stream, host_runs);
}

std::vector<KMeansResult> kmeans_on_device_points(const float* device_points, int sets, int n,
                                                  int d, int k, const uint64_t* seeds,
                                                  const KMeansOptions& options, cudaStream_t stream,
                                                  int* host_runs) {
    return kmeans_sets(nullptr, device_points, sets, n, d, k, seeds, options, stream, host_runs);
}

}  // namespace veloxquant::cuda
