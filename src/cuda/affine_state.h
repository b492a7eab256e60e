// Host side of the affine query state (codec_kernels.cuh, AffineState): measures c and M of a
// device codec's state = c + M q from the codec's own prepare, run at q = 0 and at each unit
// vector, and checks the decomposition on a random query before trusting it. The prepares (the
// probes) run here (affine_probe_states_host) or on the device beside the parameters
// (affine_state_device.cuh); affine_state_from_probes reads c and M from either.
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

/// A head's probe queries: 0 is q = 0, 1 + j the unit vector e_j, d + 1 the random check query.
inline int affine_probe_count(int d) {
    return d + 2;
}

/// Probe p's query of head h into q[d].
inline void affine_probe_query(int d, int h, int p, float* q) {
    std::fill(q, q + d, 0.0f);
    if (p >= 1 && p <= d) q[p - 1] = 1.0f;
    if (p == d + 1) {
        std::mt19937 gen(1234 + h);
        std::normal_distribution<float> normal;
        for (int j = 0; j < d; ++j) q[j] = normal(gen);
    }
}

/// Every head's check queries, [heads][d] (what a device run of the probes reads).
inline std::vector<float> affine_check_queries(int heads, int d) {
    std::vector<float> q(static_cast<std::size_t>(heads) * d);
    for (int h = 0; h < heads; ++h)
        affine_probe_query(d, h, d + 1, &q[static_cast<std::size_t>(h) * d]);
    return q;
}

/// The states of every head's probes on the host, [heads][affine_probe_count(d)][stride], the
/// entries past a head's state_floats zero. Probes run in parallel (each prepare reads only its
/// head's parameters).
template <class Codec>
std::vector<float> affine_probe_states_host(const std::vector<typename Codec::Params>& params,
                                            int d, int stride) {
    const int heads = static_cast<int>(params.size()), probes = affine_probe_count(d);
    std::vector<float> states(static_cast<std::size_t>(heads) * probes * stride, 0.0f);
    ParallelErrors errors;
#pragma omp parallel for schedule(dynamic)
    for (int item = 0; item < heads * probes; ++item)
        errors.run(item, [&] {
            std::vector<float> q(d), s(stride, 0.0f);
            affine_probe_query(d, item / probes, item % probes, q.data());
            Codec::prepare(params[item / probes], q.data(), s.data());
            std::copy(s.begin(), s.end(), &states[static_cast<std::size_t>(item) * stride]);
        });
    errors.rethrow();
    return states;
}

/// One head's part of affine_state_from_probes: c into constant[stride] and the varying rows of
/// M ([rows.size()][d], row_of[stride] naming them) from its S-float probe states
/// [affine_probe_count(d)][stride]; false when the state is not affine to 1e-4 (relative to its
/// largest entry) or M would exceed max_floats.
inline bool affine_head_from_probes(const float* probe_states, int S, int d, int stride, int h,
                                    std::size_t max_floats, float* constant, int* row_of,
                                    std::vector<float>& m, std::vector<int>& rows) {
    const float* c = probe_states;
    std::vector<float> full(static_cast<std::size_t>(S) * d);  // M, [S][d]
    for (int j = 0; j < d; ++j) {
        const float* s = probe_states + static_cast<std::size_t>(1 + j) * stride;
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
    // Affine to float accuracy on the random query?
    std::vector<float> q(d);
    affine_probe_query(d, h, d + 1, q.data());
    const float* probe = probe_states + static_cast<std::size_t>(d + 1) * stride;
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

/// Fills `out` from every head's probe states ([heads][affine_probe_count(d)][stride]; head h's
/// state has state_floats[h] entries), heads in parallel; false when a head's state is not
/// affine to 1e-4 (relative to its largest entry) or its M would exceed max_floats_per_head.
inline bool affine_state_from_probes(const std::vector<float>& probe_states,
                                     const std::vector<int>& state_floats, int d, int stride,
                                     std::size_t max_floats_per_head, AffineStateHost& out) {
    const int heads = static_cast<int>(state_floats.size()), probes = affine_probe_count(d);
    std::vector<std::vector<float>> m(heads);  // [S][d] per head, varying rows only
    std::vector<std::vector<int>> rows(heads);
    out.constant.assign(static_cast<std::size_t>(heads) * stride, 0.0f);
    out.row_of.assign(static_cast<std::size_t>(heads) * stride, -1);
    std::vector<char> affine(heads);
    ParallelErrors errors;
#pragma omp parallel for schedule(dynamic)
    for (int h = 0; h < heads; ++h)
        errors.run(h, [&] {
            affine[h] = affine_head_from_probes(
                &probe_states[static_cast<std::size_t>(h) * probes * stride], state_floats[h], d,
                stride, h, max_floats_per_head, &out.constant[static_cast<std::size_t>(h) * stride],
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

/// The measurement with the probes on the host: params are host pointers, one a head.
template <class Codec>
bool measure_affine_state(const std::vector<typename Codec::Params>& params, int d, int stride,
                          std::size_t max_floats_per_head, AffineStateHost& out) {
    std::vector<int> state_floats;
    for (const auto& p : params) state_floats.push_back(Codec::state_floats(p));
    return affine_state_from_probes(affine_probe_states_host<Codec>(params, d, stride),
                                    state_floats, d, stride, max_floats_per_head, out);
}

}  // namespace veloxquant::cuda
