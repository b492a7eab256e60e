#include "calibration/ratequant_calibration.h"

#include <cmath>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>

#include "methods/key_codec.h"

namespace veloxquant {
namespace {

double mean_squared_norm(const HeadSamples& s) {
    double sum = 0.0;
    for (float v : s.data) sum += static_cast<double>(v) * v;
    return sum / static_cast<double>(s.count());
}

}  // namespace

double DistortionCurve::operator()(double bits) const {
    return a * std::pow(beta, -bits);
}

DistortionCurve fit_distortion_curve(const std::vector<int>& bits,
                                     const std::vector<double>& distortion) {
    if (bits.size() != distortion.size())
        throw std::invalid_argument("fit_distortion_curve: " + std::to_string(bits.size()) +
                                    " bit widths but " + std::to_string(distortion.size()) +
                                    " distortions");
    if (bits.size() < 2)
        throw std::invalid_argument("fit_distortion_curve: needs at least two points");
    const double n = static_cast<double>(bits.size());
    double sx = 0.0, sy = 0.0;
    for (std::size_t i = 0; i < bits.size(); ++i) {
        if (!(distortion[i] > 0.0) || !std::isfinite(distortion[i]))
            throw std::invalid_argument(
                "fit_distortion_curve: distortion at " + std::to_string(bits[i]) +
                " bits must be positive and finite, got " + std::to_string(distortion[i]));
        sx += bits[i];
        sy += std::log(distortion[i]);
    }
    const double mx = sx / n, my = sy / n;
    double sxx = 0.0, sxy = 0.0;
    for (std::size_t i = 0; i < bits.size(); ++i) {
        sxx += (bits[i] - mx) * (bits[i] - mx);
        sxy += (bits[i] - mx) * (std::log(distortion[i]) - my);
    }
    if (sxx == 0.0)
        throw std::invalid_argument("fit_distortion_curve: needs two different bit widths");
    const double slope = sxy / sxx;  // = -log beta
    DistortionCurve c{std::exp(my - slope * mx), std::exp(-slope)};
    if (!(c.beta > 1.0))
        throw std::invalid_argument(
            "fit_distortion_curve: the distortion does not fall with bits (beta = " +
            std::to_string(c.beta) + ")");
    return c;
}

double measure_ratequant_distortion(const HeadSamples& keys, const KVCacheConfig& config, int layer,
                                    int head, int bits) {
    const int64_t n = keys.count();
    if (n < 1) throw std::invalid_argument("measure_ratequant_distortion: no keys");
    KVCacheConfig c = config;
    c.method = "ratequant";
    c.bits = bits;
    c.bit_allocation.clear();
    const auto codec = make_key_codec(c, keys.dim, layer, head);
    std::vector<uint8_t> codes(static_cast<std::size_t>(n) * codec->code_bytes());
    std::vector<float> scalars(static_cast<std::size_t>(n) * codec->num_scalars());
    std::vector<float> decoded(keys.data.size());
    codec->encode(keys.data.data(), static_cast<int>(n), codes.data(), scalars.data(),
                  static_cast<std::size_t>(n));
    codec->decode(codes.data(), scalars.data(), static_cast<std::size_t>(n), static_cast<int>(n),
                  decoded.data());
    double err = 0.0, energy = 0.0;
    for (std::size_t i = 0; i < decoded.size(); ++i) {
        const double e = static_cast<double>(keys.data[i]) - decoded[i];
        err += e * e;
        energy += static_cast<double>(keys.data[i]) * keys.data[i];
    }
    if (energy == 0.0)
        throw std::invalid_argument("measure_ratequant_distortion: every key is zero");
    return err / energy;
}

std::vector<std::vector<double>> calibrate_head_sensitivities(const Activations& acts) {
    std::vector<std::vector<double>> w(acts.layers.size());
    for (std::size_t l = 0; l < acts.layers.size(); ++l) {
        const LayerActivations& la = acts.layers[l];
        if (la.queries.size() != la.keys.size())
            throw std::invalid_argument("calibrate_head_sensitivities: layer " + std::to_string(l) +
                                        " has queries for " + std::to_string(la.queries.size()) +
                                        " heads and keys for " + std::to_string(la.keys.size()));
        for (std::size_t h = 0; h < la.keys.size(); ++h) {
            const HeadSamples& k = la.keys[h];
            const HeadSamples& q = la.queries[h];
            if (k.count() < 1 || q.count() < 1 || k.dim != q.dim)
                throw std::invalid_argument("calibrate_head_sensitivities: layer " +
                                            std::to_string(l) + " head " + std::to_string(h) +
                                            " needs keys and queries of one dim");
            w[l].push_back(mean_squared_norm(q) * mean_squared_norm(k) / k.dim);
        }
    }
    return w;
}

std::vector<double> calibrate_layer_sensitivities(const Activations& acts) {
    std::vector<double> out;
    for (const auto& heads : calibrate_head_sensitivities(acts)) {
        double s = 0.0;
        for (double v : heads) s += v;
        out.push_back(heads.empty() ? 0.0 : s / static_cast<double>(heads.size()));
    }
    return out;
}

// Reverse water-filling: for D_i(b) = a_i beta_i^-b the continuous optimum gives every unit the
// same marginal return, b_i = log_beta_i(w_i a_i ln(beta_i) / lambda), clipped to the range (the
// "water level" lambda fixed by the budget; RateQuant §3, cf. Cover & Thomas Thm 10.3.3). With
// integer widths the same condition is met by handing out bits one at a time to the unit whose
// next bit lowers the objective most: each unit's gains w a beta^-b (1 - 1/beta) fall with b
// (beta > 1), so the objective is separable and convex and this greedy order is exactly optimal
// (Gross 1956; Ibaraki & Katoh, "Resource Allocation Problems", 1988, §4.2).
std::vector<int> allocate_bits_ratequant(const std::vector<double>& w,
                                         const std::vector<DistortionCurve>& curves, double target,
                                         int min_bits, int max_bits) {
    const std::size_t n = w.size();
    if (n == 0) throw std::invalid_argument("allocate_bits_ratequant: no sensitivities");
    if (curves.size() != n)
        throw std::invalid_argument("allocate_bits_ratequant: " + std::to_string(n) +
                                    " sensitivities but " + std::to_string(curves.size()) +
                                    " curves");
    if (min_bits < 1 || max_bits > 8 || min_bits > max_bits)
        throw std::invalid_argument("allocate_bits_ratequant: bit range [" +
                                    std::to_string(min_bits) + ", " + std::to_string(max_bits) +
                                    "] must lie in [1, 8]");
    for (std::size_t i = 0; i < n; ++i) {
        if (!(w[i] > 0.0) || !std::isfinite(w[i]))
            throw std::invalid_argument("allocate_bits_ratequant: sensitivity " +
                                        std::to_string(i) + " must be positive and finite, got " +
                                        std::to_string(w[i]));
        if (!(curves[i].beta > 1.0) || !(curves[i].a > 0.0) || !std::isfinite(curves[i].a) ||
            !std::isfinite(curves[i].beta))
            throw std::invalid_argument("allocate_bits_ratequant: curve " + std::to_string(i) +
                                        " must have a > 0 and beta > 1");
    }
    if (!std::isfinite(target))
        throw std::invalid_argument("allocate_bits_ratequant: target_avg_bits must be finite");
    const long long budget = std::llround(target * static_cast<double>(n));
    const long long lo = static_cast<long long>(n) * min_bits,
                    hi = static_cast<long long>(n) * max_bits;
    if (budget < lo || budget > hi)
        throw std::invalid_argument("allocate_bits_ratequant: target " + std::to_string(target) +
                                    " bits over " + std::to_string(n) + " units is a budget of " +
                                    std::to_string(budget) + " bits, outside [" +
                                    std::to_string(lo) + ", " + std::to_string(hi) + "]");
    std::vector<int> bits(n, min_bits);
    // Gain of unit i's next bit, compared in log space (w a beta^-b spans many decades); ties go
    // to the lower index so the result is deterministic.
    auto log_gain = [&](std::size_t i) {
        const DistortionCurve& c = curves[i];
        return std::log(w[i]) + std::log(c.a) - bits[i] * std::log(c.beta) +
               std::log1p(-1.0 / c.beta);
    };
    using Entry = std::pair<double, std::size_t>;
    auto cmp = [](const Entry& x, const Entry& y) {
        return x.first < y.first || (x.first == y.first && x.second > y.second);
    };
    std::priority_queue<Entry, std::vector<Entry>, decltype(cmp)> heap(cmp);
    for (std::size_t i = 0; i < n; ++i)
        if (bits[i] < max_bits) heap.emplace(log_gain(i), i);
    for (long long left = budget - lo; left > 0; --left) {
        const std::size_t i = heap.top().second;
        heap.pop();
        ++bits[i];
        if (bits[i] < max_bits) heap.emplace(log_gain(i), i);
    }
    return bits;
}

Calibration::RateQuant calibrate_ratequant(const Activations& acts, const KVCacheConfig& config,
                                           const RateQuantOptions& opts) {
    if (acts.layers.empty())
        throw std::invalid_argument("calibrate_ratequant: the activations hold no layers");
    const auto head_w = calibrate_head_sensitivities(acts);
    Calibration::RateQuant r;
    r.target_bits = opts.target_bits;
    std::vector<DistortionCurve> curves;
    for (std::size_t l = 0; l < acts.layers.size(); ++l) {
        const auto& keys = acts.layers[l].keys;
        // Distortion per head at each fit width; a per-layer unit fits the heads' mean.
        std::vector<std::vector<double>> dist(keys.size());
        for (std::size_t h = 0; h < keys.size(); ++h)
            for (int b : opts.fit_bits)
                dist[h].push_back(measure_ratequant_distortion(keys[h], config, static_cast<int>(l),
                                                               static_cast<int>(h), b));
        if (opts.per_head) {
            for (std::size_t h = 0; h < keys.size(); ++h) {
                r.units.push_back(std::to_string(l) + "." + std::to_string(h));
                r.sensitivity.push_back(head_w[l][h]);
                curves.push_back(fit_distortion_curve(opts.fit_bits, dist[h]));
            }
        } else {
            std::vector<double> mean(opts.fit_bits.size(), 0.0);
            double w = 0.0;
            for (std::size_t h = 0; h < keys.size(); ++h) {
                for (std::size_t i = 0; i < mean.size(); ++i) mean[i] += dist[h][i] / keys.size();
                w += head_w[l][h] / keys.size();
            }
            r.units.push_back(std::to_string(l));
            r.sensitivity.push_back(w);
            curves.push_back(fit_distortion_curve(opts.fit_bits, mean));
        }
    }
    const std::vector<int> bits = allocate_bits_ratequant(r.sensitivity, curves, opts.target_bits,
                                                          opts.min_bits, opts.max_bits);
    for (std::size_t i = 0; i < bits.size(); ++i) {
        r.bit_allocation[r.units[i]] = bits[i];
        r.curve_a.push_back(curves[i].a);
        r.curve_beta.push_back(curves[i].beta);
    }
    return r;
}

}  // namespace veloxquant
