#include "core/lloyd_max.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <stdexcept>
#include <tuple>

#include "core/rng.h"
#include "core/rotation.h"

namespace veloxquant {
namespace {

constexpr double kPi = 3.14159265358979323846;

void set_boundaries(ScalarCodebook& cb) {
    cb.boundaries.resize(cb.centroids.size() - 1);
    for (std::size_t i = 0; i + 1 < cb.centroids.size(); ++i)
        cb.boundaries[i] = 0.5f * (cb.centroids[i] + cb.centroids[i + 1]);
}

// Prefix integrals of f, x f and x^2 f on a uniform grid, evaluated at arbitrary points by
// linear interpolation of the integrand (exact for piecewise-linear f).
struct GridIntegrals {
    double lo, h;
    std::vector<double> x, f, m0, m1, m2;

    GridIntegrals(const std::function<double(double)>& pdf, double lo_, double hi_, int n)
        : lo(lo_), h((hi_ - lo_) / (n - 1)), x(n), f(n), m0(n), m1(n), m2(n) {
        for (int i = 0; i < n; ++i) {
            x[i] = lo + h * i;
            f[i] = std::max(0.0, pdf(x[i]));
        }
        for (int i = 1; i < n; ++i) {
            m0[i] = m0[i - 1] + seg(i - 1, 0, x[i - 1], x[i]);
            m1[i] = m1[i - 1] + seg(i - 1, 1, x[i - 1], x[i]);
            m2[i] = m2[i - 1] + seg(i - 1, 2, x[i - 1], x[i]);
        }
    }
    // Integral of x^p f(x) over [a, b] inside grid cell i, f linear on the cell (Simpson: exact
    // for the cubic x^2 f).
    double seg(int i, int p, double a, double b) const {
        auto fx = [&](double t) {
            const double w = (t - x[i]) / h;
            return (1 - w) * f[i] + w * f[i + 1];
        };
        auto g = [&](double t) { return std::pow(t, p) * fx(t); };
        const double mid = 0.5 * (a + b);
        return (b - a) / 6.0 * (g(a) + 4 * g(mid) + g(b));
    }
    double cumulative(int p, double t) const {
        const int n = static_cast<int>(x.size());
        if (t <= x[0]) return 0.0;
        const std::vector<double>& m = p == 0 ? m0 : (p == 1 ? m1 : m2);
        if (t >= x[n - 1]) return m[n - 1];
        int i = static_cast<int>((t - lo) / h);
        i = std::min(std::max(i, 0), n - 2);
        return m[i] + seg(i, p, x[i], t);
    }
    double integral(int p, double a, double b) const { return cumulative(p, b) - cumulative(p, a); }
};

}  // namespace

ScalarCodebook lloyd_max_density(const std::function<double(double)>& pdf, double lo, double hi,
                                 int bits) {
    if (bits < 1 || bits > 8) throw std::invalid_argument("Lloyd-Max bits must be in 1..8");
    const int k = 1 << bits;
    const GridIntegrals g(pdf, lo, hi, 200001);
    const double total = g.m0.back();
    std::vector<double> c(k);
    // Start from the quantiles' midpoints of the law: converges quickly and symmetrically.
    {
        int j = 0;
        for (int i = 0; i < k; ++i) {
            const double target = total * (i + 0.5) / k;
            while (j + 1 < static_cast<int>(g.x.size()) && g.m0[j + 1] < target) ++j;
            c[i] = g.x[j];
        }
    }
    std::vector<double> t(k + 1);
    for (int iter = 0; iter < 1000; ++iter) {
        t[0] = lo;
        t[k] = hi;
        for (int i = 1; i < k; ++i) t[i] = 0.5 * (c[i - 1] + c[i]);
        double change = 0.0;
        for (int i = 0; i < k; ++i) {
            const double mass = g.integral(0, t[i], t[i + 1]);
            if (mass <= 1e-300) continue;
            const double nc = g.integral(1, t[i], t[i + 1]) / mass;
            change = std::max(change, std::fabs(nc - c[i]));
            c[i] = nc;
        }
        if (change < 1e-12 * (hi - lo)) break;
    }
    for (int i = 1; i < k; ++i) t[i] = 0.5 * (c[i - 1] + c[i]);
    double mse = 0.0;
    for (int i = 0; i < k; ++i) {
        const double a = t[i], b = t[i + 1];
        mse += g.integral(2, a, b) - 2 * c[i] * g.integral(1, a, b) +
               c[i] * c[i] * g.integral(0, a, b);
    }
    ScalarCodebook cb;
    cb.bits = bits;
    cb.mse = mse / total;
    cb.centroids.assign(c.begin(), c.end());
    set_boundaries(cb);
    return cb;
}

ScalarCodebook lloyd_max_samples(std::vector<double> s, int bits) {
    if (bits < 1 || bits > 8) throw std::invalid_argument("Lloyd-Max bits must be in 1..8");
    if (s.empty()) throw std::invalid_argument("Lloyd-Max needs samples");
    const int k = 1 << bits;
    std::sort(s.begin(), s.end());
    const std::size_t n = s.size();
    std::vector<double> p1(n + 1, 0.0), p2(n + 1, 0.0);
    for (std::size_t i = 0; i < n; ++i) {
        p1[i + 1] = p1[i] + s[i];
        p2[i + 1] = p2[i] + s[i] * s[i];
    }
    std::vector<double> c(k);
    for (int i = 0; i < k; ++i)
        c[i] = s[std::min(n - 1, static_cast<std::size_t>((i + 0.5) * n / k))];
    std::vector<std::size_t> cut(k + 1);
    for (int iter = 0; iter < 1000; ++iter) {
        cut[0] = 0;
        cut[k] = n;
        for (int i = 1; i < k; ++i) {
            const double b = 0.5 * (c[i - 1] + c[i]);
            cut[i] = static_cast<std::size_t>(std::upper_bound(s.begin(), s.end(), b) - s.begin());
        }
        double change = 0.0;
        for (int i = 0; i < k; ++i) {
            const std::size_t a = cut[i], b = cut[i + 1];
            if (b <= a) continue;
            const double nc = (p1[b] - p1[a]) / static_cast<double>(b - a);
            change = std::max(change, std::fabs(nc - c[i]));
            c[i] = nc;
        }
        if (change < 1e-13) break;
    }
    // Final cells for the sorted centroids (an emptied cell may have left one out of order).
    std::sort(c.begin(), c.end());
    cut[0] = 0;
    cut[k] = n;
    for (int i = 1; i < k; ++i)
        cut[i] = static_cast<std::size_t>(
            std::upper_bound(s.begin(), s.end(), 0.5 * (c[i - 1] + c[i])) - s.begin());
    double sse = 0.0;
    for (int i = 0; i < k; ++i) {
        const std::size_t a = cut[i], b = cut[i + 1];
        sse += (p2[b] - p2[a]) - 2 * c[i] * (p1[b] - p1[a]) + c[i] * c[i] * (b - a);
    }
    ScalarCodebook cb;
    cb.bits = bits;
    cb.mse = sse / static_cast<double>(n);
    cb.centroids.assign(c.begin(), c.end());
    set_boundaries(cb);
    return cb;
}

namespace {

std::mutex g_cache_mutex;

template <typename Key, typename Make>
const ScalarCodebook& cached(std::map<Key, ScalarCodebook>& cache, const Key& key, Make make) {
    {
        std::lock_guard<std::mutex> lock(g_cache_mutex);
        auto it = cache.find(key);
        if (it != cache.end()) return it->second;
    }
    ScalarCodebook cb = make();
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    return cache.emplace(key, std::move(cb)).first->second;  // std::map nodes are stable
}

}  // namespace

const ScalarCodebook& rotated_coordinate_codebook(int d, int bits) {
    static std::map<std::pair<int, int>, ScalarCodebook> cache;
    return cached(cache, std::make_pair(d, bits), [&] {
        if (d < 3) throw std::invalid_argument("rotated-coordinate codebook needs d >= 3");
        const double e = 0.5 * (d - 3);
        const double sigma = 1.0 / std::sqrt(static_cast<double>(d));
        const double r = std::min(1.0, 12.0 * sigma);
        // log-domain evaluation avoids underflow of (1 - x^2)^e for large d.
        return lloyd_max_density(
            [e](double x) {
                const double u = 1.0 - x * x;
                return u <= 0.0 ? 0.0 : std::exp(e * std::log(u));
            },
            -r, r, bits);
    });
}

const ScalarCodebook& residual_codebook(int d, int bits, int stage) {
    static std::map<std::tuple<int, int, int>, ScalarCodebook> cache;
    return cached(cache, std::make_tuple(d, bits, stage), [&] {
        // Coordinates of random unit vectors, run through the previous stages.
        Rng rng(derive_seed(0x5EED, stage, bits, d, RandomPurpose::kResidualFit));
        std::vector<const ScalarCodebook*> previous;
        for (int s = 0; s < stage; ++s)
            previous.push_back(s == 0 ? &rotated_coordinate_codebook(d, bits)
                                      : &residual_codebook(d, bits, s));
        const int vectors = std::max(64, (1 << 18) / d);
        std::vector<double> samples;
        samples.reserve(static_cast<std::size_t>(vectors) * d);
        std::vector<double> v(d);
        for (int n = 0; n < vectors; ++n) {
            double norm = 0.0;
            for (auto& x : v) {
                x = rng.normal();
                norm += x * x;
            }
            norm = std::sqrt(norm);
            for (auto& x : v) {
                double r = x / norm;
                for (const ScalarCodebook* cb : previous)
                    r -= cb->centroids[cb->quantize(static_cast<float>(r))];
                samples.push_back(r);
            }
        }
        return lloyd_max_samples(std::move(samples), bits);
    });
}

const ScalarCodebook& polar_angle_codebook(int level, int bits) {
    static std::map<std::pair<int, int>, ScalarCodebook> cache;
    return cached(cache, std::make_pair(level, bits), [&] {
        if (level < 1) throw std::invalid_argument("polar level must be >= 1");
        if (bits < 1 || bits > 8) throw std::invalid_argument("Lloyd-Max bits must be in 1..8");
        if (level == 1) {  // uniform on [0, 2 pi): equal cells
            ScalarCodebook cb;
            cb.bits = bits;
            const int k = 1 << bits;
            const double w = 2 * kPi / k;
            for (int i = 0; i < k; ++i) cb.centroids.push_back(static_cast<float>((i + 0.5) * w));
            cb.mse = w * w / 12.0;
            set_boundaries(cb);
            return cb;
        }
        const double power = std::ldexp(1.0, level - 1) - 1.0;
        return lloyd_max_density([power](double psi) { return std::pow(std::sin(2 * psi), power); },
                                 0.0, kPi / 2, bits);
    });
}

const ScalarCodebook& gaussian_codebook(int bits) {
    static std::map<int, ScalarCodebook> cache;
    return cached(cache, bits, [&] {
        // The unnormalised density exp(-x^2/2) on +-12: the mass beyond is below 1e-32.
        return lloyd_max_density([](double x) { return std::exp(-0.5 * x * x); }, -12.0, 12.0,
                                 bits);
    });
}

}  // namespace veloxquant
