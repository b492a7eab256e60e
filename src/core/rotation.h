// Orthogonal rotations of R^d: the randomized Walsh-Hadamard transform (random signs, then the
// orthonormal Sylvester WHT, O(d log d)) where d is a power of two, otherwise a seeded dense
// Haar-random orthogonal matrix (QR of a Gaussian matrix).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace veloxquant {

class Rotation {
public:
    static constexpr int kMaxDim = 1024;

    Rotation() = default;
    /// use_hadamard is honoured only when d is a power of two; seed is already derived.
    Rotation(int d, bool use_hadamard, uint64_t seed);

    int dim() const { return d_; }
    bool is_hadamard() const { return hadamard_; }

    /// y = R x (x and y may alias).
    void forward(const float* x, float* y) const;
    /// x = R^T y (x and y may alias).
    void inverse(const float* y, float* x) const;

    /// Random signs of the Hadamard form (empty for a dense matrix).
    const std::vector<float>& signs() const { return signs_; }
    /// Row-major dense matrix (empty for Hadamard).
    const std::vector<float>& matrix() const { return matrix_; }
    std::size_t parameter_bytes() const;

private:
    int d_ = 0;
    bool hadamard_ = false;
    std::vector<float> signs_;
    std::vector<float> matrix_;
};

bool is_power_of_two(int d);

/// In-place orthonormal fast Walsh-Hadamard transform of length n (a power of two).
void fwht_orthonormal(float* x, int n);

}  // namespace veloxquant
