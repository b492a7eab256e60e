// k-means of several independent point sets on the GPU, bit for bit the CPU's kmeans()
// (core/kmeans.h): what a device cache's rabitq heads train on their first append. On the host
// the heads' k-means took ~75 ms a layer of 8 heads on 16 threads (2048 rows of d = 128, 64
// clusters; bench/results/cuda_h200_20261201a_rabitq_first_append_parts.txt), most of a rabitq
// prefill's time beyond DynamicCache's.
//
// Every step is the CPU's arithmetic in the CPU's order, so the results match exactly:
// - k-means++ seeding, two kernels a round: the distances to the newest seed over many CTAs a
//   set, eight lanes a point (lane l adds squared_distance's partial sum l; no contracted
//   multiply-adds: this file compiles with --fmad=false); then, a CTA a set, their running double
//   sums in index order (the same partial sums as the CPU's ordered_sum and sampling scan: by the
//   CTA as exact integers where no partial sum rounds, exact_running_sum.cuh, else by one
//   thread), the CPU's Rng draws made on the host beforehand, and the drawn point found in
//   parallel as the first whose running sum passes the draw;
// - assignment a warp a point, the lanes over the centroids (the rabitq encoder's rb_nearest:
//   squared_distance's sums, ties to the lower index);
// - the update's sums in point order, a thread a (centroid, coordinate), in double, over its
//   cluster's members (listed in point order by warp ballots);
// - the objective's double sum in index order (as the seeding's), and the CPU's stopping tests.
// Two rare paths stay on the host, where kmeans() itself runs that set from the start: a
// seeding round whose points all sit on seeds (the CPU then draws a different random number),
// and an empty cluster (the CPU re-seeds it). So do head dims that are not a multiple of 8, sets
// larger than the kernels' shared memory, and random-distinct seeding.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "core/kmeans.h"

namespace veloxquant::cuda {

/// kmeans(points + s * n * d, n, d, k, seeds[s], options) for each of `sets` sets of host points
/// [sets][n][d], run on the device on `stream` (synchronized before the return). The results
/// (centroids, assignment, objective history) are kmeans()'s exactly. *host_runs, when given,
/// counts the sets that ran on the host instead. Throws what kmeans() throws for bad sizes or
/// options, std::runtime_error for a CUDA error.
std::vector<KMeansResult> kmeans_on_device(const float* points, int sets, int n, int d, int k,
                                           const uint64_t* seeds, const KMeansOptions& options,
                                           cudaStream_t stream, int* host_runs = nullptr);

/// The same for points already on the device, device_points [sets][n][d] (read on `stream`): the
/// points travel to the host only for the sets the host runs (all of them where device_points is
/// not 16-byte aligned, as cudaMalloc's are).
std::vector<KMeansResult> kmeans_on_device_points(const float* device_points, int sets, int n,
                                                  int d, int k, const uint64_t* seeds,
                                                  const KMeansOptions& options, cudaStream_t stream,
                                                  int* host_runs = nullptr);

}  // namespace veloxquant::cuda
