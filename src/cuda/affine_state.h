// Host side of the affine query state (codec_kernels.cuh, AffineState): measures c and M of a
// device codec's state = c + M q from the codec's own prepare, run on the host at q = 0 and at
// each unit vector, and checks the decomposition on a random query before trusting it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

namespace veloxquant::cuda {

struct AffineStateHost {
    std::vector<float> constant;  ///< [heads][stride]
    std::vector<float> matrix;    ///< [heads][d][varying]
    std::vector<int> row_of;      ///< [heads][stride], -1 for constant entries
    int varying = 0;
};

/// Fills `out` for params (host pointers) of every head; false when the state is not affine to
/// 1e-4 (relative to its largest entry) or M would exceed max_floats_per_head.
template <class Codec>
bool measure_affine_state(const std::vector<typename Codec::Params>& params, int d, int stride,
                          std::size_t max_floats_per_head, AffineStateHost& out) {
    const int heads = static_cast<int>(params.size());
    std::vector<std::vector<float>> m(heads);  // [S][d] per head, varying rows only
    std::vector<std::vector<int>> rows(heads);
    std::vector<float> q(d, 0.0f), s(stride), c(stride), probe(stride);
    out.constant.assign(static_cast<std::size_t>(heads) * stride, 0.0f);
    out.row_of.assign(static_cast<std::size_t>(heads) * stride, -1);
    for (int h = 0; h < heads; ++h) {
        const int S = Codec::state_floats(params[h]);
        std::fill(q.begin(), q.end(), 0.0f);
        Codec::prepare(params[h], q.data(), c.data());
        std::vector<float> full(static_cast<std::size_t>(S) * d);
        for (int j = 0; j < d; ++j) {
            q.assign(d, 0.0f);
            q[j] = 1.0f;
            Codec::prepare(params[h], q.data(), s.data());
            for (int i = 0; i < S; ++i) full[static_cast<std::size_t>(i) * d + j] = s[i] - c[i];
        }
        for (int i = 0; i < S; ++i) {
            out.constant[static_cast<std::size_t>(h) * stride + i] = c[i];
            const float* r = &full[static_cast<std::size_t>(i) * d];
            if (std::any_of(r, r + d, [](float x) { return x != 0.0f; })) {
                out.row_of[static_cast<std::size_t>(h) * stride + i] =
                    static_cast<int>(rows[h].size());
                rows[h].push_back(i);
                m[h].insert(m[h].end(), r, r + d);
            }
        }
        if (rows[h].size() * static_cast<std::size_t>(d) > max_floats_per_head) return false;
        // Affine to float accuracy on a random query?
        std::mt19937 gen(1234 + h);
        std::normal_distribution<float> normal;
        for (float& x : q) x = normal(gen);
        Codec::prepare(params[h], q.data(), probe.data());
        double err = 0.0, scale = 1e-30;
        for (int i = 0; i < S; ++i) {
            double x = c[i];
            const int k = out.row_of[static_cast<std::size_t>(h) * stride + i];
            if (k >= 0)
                for (int j = 0; j < d; ++j)
                    x += static_cast<double>(m[h][static_cast<std::size_t>(k) * d + j]) * q[j];
            err = std::max(err, std::fabs(x - probe[i]));
            scale = std::max(scale, std::fabs(static_cast<double>(probe[i])));
        }
        if (!(err <= 1e-4 * scale)) return false;
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
