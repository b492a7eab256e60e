// Calibration of the spectral method: per layer and KV head, the eigendecomposition of the key
// covariance (principal directions, their variances), the key mean and the queries' second
// moments along the principal directions, in the layout of KVCacheConfig.rotations. The symmetric
// eigen-solver it uses (cyclic Jacobi) is exposed for tests.
#pragma once

#include <vector>

#include "calibration/activations.h"
#include "veloxquant/config.h"

namespace veloxquant {

/// Eigenpairs of a symmetric matrix, eigenvalues in descending order.
struct SymmetricEigen {
    int n = 0;
    std::vector<double> values;   ///< [n], descending
    std::vector<double> vectors;  ///< [n][n], row r = unit eigenvector of values[r]
};

/// Cyclic Jacobi eigen-solver (Golub & Van Loan, Matrix Computations, 4th ed., Alg. 8.5.3) for a
/// symmetric n x n matrix a (row-major; only symmetry up to rounding is assumed, the mean of
/// a[i][j] and a[j][i] is used). Off-diagonal entries below 1e-16 of the geometric mean of
/// their two diagonal entries (or 1e-20 of the Frobenius norm) count as zero; sweeps stop when
/// one needs no rotation (at most 100 sweeps). Each eigenvector's largest-magnitude entry is made
/// positive so the result is deterministic. Throws std::invalid_argument for n < 1, a of the
/// wrong size, or non-finite entries.
SymmetricEigen symmetric_eigen(const std::vector<double>& a, int n);

/// For every layer, a FloatArray of shape [kv_heads][d + 3][d]: rows 0..d-1 the eigenvectors of
/// the head's key covariance (row r = r-th principal direction, eigenvalues descending), row d
/// the eigenvalues (covariance with divisor N - 1, negatives from rounding clamped to 0), row
/// d + 1 the key mean, row d + 2 the query second moments w_r = mean over the head's query rows
/// (acts.layers[l].queries[h], the queries of the heads that read it) of (u_r . q)^2, which
/// weigh the bit allocation of the codec; all 1 when the head has no query rows. Keys and
/// queries are taken as given (post-RoPE, as the cache receives them). Throws
/// std::invalid_argument naming the layer and head when a layer has no key heads, a head has
/// fewer than 2 rows, the heads of a layer differ in dim, a query row's dim differs from the
/// keys', or a key or query is not finite.
std::vector<FloatArray> calibrate_spectral_rotation(const Activations& acts);

}  // namespace veloxquant
