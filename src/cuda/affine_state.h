// Host side of the affine query state (codec_kernels.cuh, AffineState): measures c and M of a
// device codec's state = c + M q from the codec's own prepare, run on the host at q = 0 and at
// each unit vector, and checks the decomposition on a random query before trusting it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

#include "core/parallel_errors.h"

namespace veloxquant::cuda {

struct AffineStateHost {
    std::vector<float> constant;  ///< [heads][stride]
    std::vector<float> matrix;    ///< [heads][d][varying]
    std::vector<int> row_of;      ///< [heads][stride], -1 for constant entries
    int varying = 0;
};

/// One head's part of measure_affine_state: c into constant[stride] and the varying rows of M
/// ([rows.size()][d], row_of[stride] naming them); false when the state is not affine to 1e-4
/// (relative to its largest entry) or M would exceed max_floats.
template <class Codec>
bool measure_affine_head(const typename Codec::Params& p, int d, int stride, int h,
                         std::size_t max_floats, float* constant, int* row_of,
                         std::vector<float>& m, std::vector<int>& rows) {
    const int S = Codec::state_floats(p);
    std::vector<float> q(d, 0.0f), s(stride), c(stride), probe(stride);
    Codec::prepare(p, q.data(), c.data());
    std::vector<float> full(static_cast<std::size_t>(S) * d);
    for (int j = 0; j < d; ++j) {
        q.assign(d, 0.0f);
        q[j] = 1.0f;
        Codec::prepare(p, q.data(), s.data());
        for (int i = 0; i < S; ++i) full[static_cast<std::size_t>(i) * d + j] = s[i] - c[i];
    }
    for (int i = 0; i < S; ++i) {
        constant[i] = c[i];
        const float* r = &full[static_cast<std::size_t>(i) * d];
        if (std::any_of(r, r + d, [](float x) { return x != 0.0f; })) {
            row_of[i] = static_cast<int>(rows.size());
            rows.push_back(i);
            m.insert(m.end(), r, r + d);
        }
    }
    if (rows.size() * static_cast<std::size_t>(d) > max_floats) return false;
    // Affine to float accuracy on a random query?
    std::mt19937 gen(1234 + h);
    std::normal_distribution<float> normal;
    for (float& x : q) x = normal(gen);
    Codec::prepare(p, q.data(), probe.data());
    double err = 0.0, scale = 1e-30;
    for (int i = 0; i < S; ++i) {
        double x = c[i];
        const int k = row_of[i];
        if (k >= 0)
            for (int j = 0; j < d; ++j)
                x += static_cast<double>(m[static_cast<std::size_t>(k) * d + j]) * q[j];
        err = std::max(err, std::fabs(x - probe[i]));
        scale = std::max(scale, std::fabs(static_cast<double>(probe[i])));
    }
    return err <= 1e-4 * scale;
}

/// Fills `out` for params (host pointers) of every head; false when a head's state is not
/// affine to 1e-4 (relative to its largest entry) or its M would exceed max_floats_per_head.
/// Heads are measured in parallel (each prepare reads only its head's parameters).
template <class Codec>
bool measure_affine_state(const std::vector<typename Codec::Params>& params, int d, int stride,
                          std::size_t max_floats_per_head, AffineStateHost& out) {
    const int heads = static_cast<int>(params.size());
    std::vector<std::vector<float>> m(heads);  // [S][d] per head, varying rows only
    std::vector<std::vector<int>> rows(heads);
    std::vector<char> affine(heads);
    out.constant.assign(static_cast<std::size_t>(heads) * stride, 0.0f);
    out.row_of.assign(static_cast<std::size_t>(heads) * stride, -1);
    ParallelErrors errors;
#pragma omp parallel for schedule(dynamic)
    for (int h = 0; h < heads; ++h)
        errors.run(h, [&] {
            affine[h] = measure_affine_head<Codec>(
                params[h], d, stride, h, max_floats_per_head,
                &out.constant[static_cast<std::size_t>(h) * stride],
                &out.row_of[static_cast<std::size_t>(h) * stride], m[h], rows[h]);
        });
    errors.rethrow();
    out.varying = 0;
    for (int h = 0; h < heads; ++h) {
        if (!affine[h]) return false;
        out.varying = std::max(out.varying, static_cast<int>(rows[h].size()));
    }
    out.matrix.assign(static_cast<std::size_t>(heads) * d * std::max(out.varying, 1), 0.0f);
    for (int h = 0; h < heads; ++h)
        for (std::size_t k = 0; k < rows[h].size(); ++k)
            for (int j = 0; j < d; ++j)
                out.matrix[(static_cast<std::size_t>(h) * d + j) * out.varying + k] =
                    m[h][k * d + j];
    return true;
}

}  // namespace veloxquant::cuda
