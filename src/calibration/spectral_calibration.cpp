#include "calibration/spectral_calibration.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

#include "core/parallel_errors.h"

namespace veloxquant {

SymmetricEigen symmetric_eigen(const std::vector<double>& input, int n) {
    if (n < 1)
        throw std::invalid_argument("symmetric_eigen: n must be >= 1, got " + std::to_string(n));
    const std::size_t nn = static_cast<std::size_t>(n) * n;
    if (input.size() != nn)
        throw std::invalid_argument("symmetric_eigen: matrix has " + std::to_string(input.size()) +
                                    " entries, expected n*n = " + std::to_string(nn));
    for (double x : input)
        if (!std::isfinite(x))
            throw std::invalid_argument("symmetric_eigen: matrix contains NaN or Inf");
    std::vector<double> a(nn), v(nn, 0.0);
    double frob = 0.0;
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) {
            a[i * n + j] = 0.5 * (input[i * n + j] + input[j * n + i]);
            frob += a[i * n + j] * a[i * n + j];
        }
    for (int i = 0; i < n; ++i) v[i * n + i] = 1.0;
    const double floor = 1e-20 * std::sqrt(frob);

    for (int sweep = 0; sweep < 100; ++sweep) {
        bool rotated = false;
        for (int p = 0; p < n - 1; ++p) {
            for (int q = p + 1; q < n; ++q) {
                const double apq = a[p * n + q];
                // An entry below rounding level of its diagonal pair is set to zero (the
                // relative threshold of Demmel & Veselic 1992); a sweep without a rotation ends.
                if (std::fabs(apq) <=
                    std::max(floor, 1e-16 * std::sqrt(std::fabs(a[p * n + p] * a[q * n + q])))) {
                    a[p * n + q] = a[q * n + p] = 0.0;
                    continue;
                }
                rotated = true;
                // The rotation J(p, q) with c = cos, s = sin that zeroes a_pq in J^T A J
                // (Golub & Van Loan, Alg. 8.5.1): tau = (a_qq - a_pp) / (2 a_pq), t the smaller
                // root of t^2 + 2 tau t - 1 = 0.
                const double tau = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                const double t =
                    (tau >= 0.0 ? 1.0 : -1.0) / (std::fabs(tau) + std::sqrt(1.0 + tau * tau));
                const double c = 1.0 / std::sqrt(1.0 + t * t), s = t * c;
                for (int k = 0; k < n; ++k) {  // A <- A J, V <- V J (columns p, q)
                    const double akp = a[k * n + p], akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                    const double vkp = v[k * n + p], vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
                for (int k = 0; k < n; ++k) {  // A <- J^T A (rows p, q)
                    const double apk = a[p * n + k], aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                a[p * n + q] = a[q * n + p] = 0.0;  // exactly zero in exact arithmetic
            }
        }
        if (!rotated) break;
    }

    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int x, int y) { return a[x * n + x] > a[y * n + y]; });
    SymmetricEigen e;
    e.n = n;
    e.values.resize(n);
    e.vectors.resize(nn);
    for (int r = 0; r < n; ++r) {
        const int col = order[r];
        e.values[r] = a[col * n + col];
        int big = 0;
        for (int k = 1; k < n; ++k)
            if (std::fabs(v[k * n + col]) > std::fabs(v[big * n + col])) big = k;
        const double sign = v[big * n + col] < 0.0 ? -1.0 : 1.0;
        for (int k = 0; k < n; ++k)
            e.vectors[static_cast<std::size_t>(r) * n + k] = sign * v[k * n + col];
    }
    return e;
}

namespace {

// Checks every layer's key heads before any work starts; returns each layer's dim.
std::vector<int> checked_dims(const Activations& acts) {
    const std::string fn = "calibrate_spectral_rotation: ";
    if (acts.layers.empty()) throw std::invalid_argument(fn + "the activations hold no layers");
    std::vector<int> dims;
    for (std::size_t l = 0; l < acts.layers.size(); ++l) {
        const auto& heads = acts.layers[l].keys;
        const std::string at = "layer " + std::to_string(l);
        if (heads.empty()) throw std::invalid_argument(fn + at + " has no key heads");
        const int d = heads[0].dim;
        for (std::size_t h = 0; h < heads.size(); ++h) {
            const HeadSamples& s = heads[h];
            const std::string ah = at + " head " + std::to_string(h);
            if (s.dim < 2 || s.dim > 1024)
                throw std::invalid_argument(fn + ah + ": key dim must be in 2..1024, got " +
                                            std::to_string(s.dim));
            if (s.dim != d)
                throw std::invalid_argument(fn + ah + ": key dim " + std::to_string(s.dim) +
                                            " differs from head 0's " + std::to_string(d));
            if (s.data.size() % static_cast<std::size_t>(s.dim) != 0)
                throw std::invalid_argument(fn + ah + ": key data is not a whole number of rows");
            if (s.count() < 2)
                throw std::invalid_argument(fn + ah + " has " + std::to_string(s.count()) +
                                            " key rows; a covariance needs at least 2");
            for (float x : s.data)
                if (!std::isfinite(x))
                    throw std::invalid_argument(fn + ah + ": keys contain NaN or Inf");
            if (h < acts.layers[l].queries.size()) {
                const HeadSamples& q = acts.layers[l].queries[h];
                if (q.count() > 0 && q.dim != d)
                    throw std::invalid_argument(fn + ah + ": query dim " + std::to_string(q.dim) +
                                                " differs from the key dim " + std::to_string(d));
                if (q.count() > 0 && q.data.size() % static_cast<std::size_t>(q.dim) != 0)
                    throw std::invalid_argument(fn + ah +
                                                ": query data is not a whole number of rows");
                for (float x : q.data)
                    if (!std::isfinite(x))
                        throw std::invalid_argument(fn + ah + ": queries contain NaN or Inf");
            }
        }
        dims.push_back(d);
    }
    return dims;
}

// Rows [d + 3][d] of one head: eigenvectors, eigenvalues, mean, query second moments (all 1
// when `queries` is null or empty).
void calibrate_head(const HeadSamples& s, const HeadSamples* queries, float* out) {
    const int d = s.dim;
    const int64_t n = s.count();
    std::vector<double> mean(d, 0.0);
    for (int64_t i = 0; i < n; ++i)
        for (int j = 0; j < d; ++j) mean[j] += s.row(i)[j];
    for (double& m : mean) m /= static_cast<double>(n);
    std::vector<double> cov(static_cast<std::size_t>(d) * d, 0.0), x(d);
    for (int64_t i = 0; i < n; ++i) {
        for (int j = 0; j < d; ++j) x[j] = s.row(i)[j] - mean[j];
        for (int a = 0; a < d; ++a)
            for (int b = a; b < d; ++b) cov[a * d + b] += x[a] * x[b];
    }
    for (int a = 0; a < d; ++a)
        for (int b = a; b < d; ++b) cov[b * d + a] = cov[a * d + b] /= static_cast<double>(n - 1);
    const SymmetricEigen e = symmetric_eigen(cov, d);
    for (std::size_t i = 0; i < e.vectors.size(); ++i) out[i] = static_cast<float>(e.vectors[i]);
    float* lam = out + static_cast<std::size_t>(d) * d;
    for (int r = 0; r < d; ++r) lam[r] = static_cast<float>(std::max(0.0, e.values[r]));
    float* mu = lam + d;
    for (int j = 0; j < d; ++j) mu[j] = static_cast<float>(mean[j]);
    float* w = mu + d;
    const int64_t nq = queries ? queries->count() : 0;
    for (int r = 0; r < d; ++r) {
        if (nq == 0) {
            w[r] = 1.0f;
            continue;
        }
        const double* u = &e.vectors[static_cast<std::size_t>(r) * d];
        double acc = 0.0;
        for (int64_t i = 0; i < nq; ++i) {
            const float* q = queries->row(i);
            double p = 0.0;
            for (int j = 0; j < d; ++j) p += u[j] * q[j];
            acc += p * p;
        }
        w[r] = static_cast<float>(acc / static_cast<double>(nq));
    }
}

}  // namespace

std::vector<FloatArray> calibrate_spectral_rotation(const Activations& acts) {
    const std::vector<int> dims = checked_dims(acts);
    std::vector<FloatArray> out(acts.layers.size());
    std::vector<std::pair<int, int>> jobs;
    for (std::size_t l = 0; l < acts.layers.size(); ++l) {
        const int heads = static_cast<int>(acts.layers[l].keys.size());
        const int d = dims[l];
        out[l].shape = {heads, d + 3, d};
        out[l].data.assign(static_cast<std::size_t>(heads) * (d + 3) * d, 0.0f);
        for (int h = 0; h < heads; ++h) jobs.emplace_back(static_cast<int>(l), h);
    }
    ParallelErrors errors;
#pragma omp parallel for schedule(dynamic)
    for (int i = 0; i < static_cast<int>(jobs.size()); ++i) {
        errors.run(i, [&] {
            const auto [l, h] = jobs[i];
            const int d = dims[l];
            const auto& qs = acts.layers[l].queries;
            calibrate_head(acts.layers[l].keys[h],
                           static_cast<std::size_t>(h) < qs.size() ? &qs[h] : nullptr,
                           out[l].data.data() + static_cast<std::size_t>(h) * (d + 3) * d);
        });
    }
    errors.rethrow();
    return out;
}

}  // namespace veloxquant
