#include "calibration/commvq_calibration.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

#include "core/parallel_errors.h"
#include "core/rng.h"
#include "methods/commvq.h"

namespace veloxquant {
namespace {

std::string str(long long v) {
    return std::to_string(v);
}

int log2_exact(int c) {
    int b = 0;
    while ((1 << b) < c) ++b;
    return (1 << b) == c ? b : -1;
}

// Stage codewords of one group [stages][C][gd] fitted to x [n][gd]; returns the squared error
// after the initialisation and after each sweep.
std::vector<double> fit_group(const std::vector<float>& x, int n, int gd, int stages, int C,
                              uint64_t seed, const CommVQFitOptions& opt, float* words) {
    const std::size_t N = static_cast<std::size_t>(n);
    std::vector<float> residual(x);
    std::vector<int> assign(static_cast<std::size_t>(stages) * N);
    std::vector<float> norms(static_cast<std::size_t>(stages) * C);
    std::vector<float> words_t(static_cast<std::size_t>(stages) * C * gd);  // [stages][gd][C]
    auto W = [&](int s, int c) { return words + (static_cast<std::size_t>(s) * C + c) * gd; };
    auto update_norms = [&](int s) {
        for (int c = 0; c < C; ++c) {
            double v = 0.0;
            for (int j = 0; j < gd; ++j) v += static_cast<double>(W(s, c)[j]) * W(s, c)[j];
            norms[static_cast<std::size_t>(s) * C + c] = static_cast<float>(v);
        }
        commvq_transpose(W(s, 0), C, gd, &words_t[static_cast<std::size_t>(s) * C * gd]);
    };
    // The error recomputed from the codes (not the running residual), in double.
    auto objective = [&]() {
        double total = 0.0;
        for (std::size_t i = 0; i < N; ++i)
            for (int j = 0; j < gd; ++j) {
                double e = x[i * gd + j];
                for (int s = 0; s < stages; ++s) e -= W(s, assign[s * N + i])[j];
                total += e * e;
            }
        return total;
    };

    std::vector<float> target(static_cast<std::size_t>(gd));
    std::vector<double> sums(static_cast<std::size_t>(C) * gd);
    std::vector<int> counts(C);
    // One EM step on stage s given the other stages; `residual` excludes no stage on entry
    // and on exit.
    auto em_step = [&](int s) {
        std::fill(sums.begin(), sums.end(), 0.0);
        std::fill(counts.begin(), counts.end(), 0);
        // E-step: the nearest codeword to the target x - (other stages); the targets accumulate
        // for the M-step.
        for (std::size_t i = 0; i < N; ++i) {
            float* r = &residual[i * gd];
            const float* old = W(s, assign[s * N + i]);
            for (int j = 0; j < gd; ++j) target[j] = r[j] + old[j];
            const int a = commvq_nearest(target.data(), &words_t[s * C * gd], &norms[s * C], C, gd);
            assign[s * N + i] = a;
            ++counts[a];
            for (int j = 0; j < gd; ++j) sums[static_cast<std::size_t>(a) * gd + j] += target[j];
            for (int j = 0; j < gd; ++j) r[j] = target[j];  // residual without stage s
        }
        // M-step: each codeword moves to the mean of its targets.
        for (int c = 0; c < C; ++c)
            if (counts[c] > 0)
                for (int j = 0; j < gd; ++j) W(s, c)
        [j] = static_cast<float>(sums[static_cast<std::size_t>(c) * gd + j] / counts[c]);
        update_norms(s);
        for (std::size_t i = 0; i < N; ++i)
            for (int j = 0; j < gd; ++j) residual[i * gd + j] -= W(s, assign[s * N + i])[j];
    };

    // Initialisation, stage by stage on what the earlier stages left: C distinct residuals
    // drawn uniformly (partial Fisher-Yates), then Lloyd iterations of that stage alone (the
    // stages not yet initialised are zero codewords with index 0).
    std::fill(words, words + static_cast<std::size_t>(stages) * C * gd, 0.0f);
    for (int s = 0; s < stages; ++s) update_norms(s);
    Rng rng(seed);
    std::vector<int> order(n);
    for (int s = 0; s < stages; ++s) {
        for (int i = 0; i < n; ++i) order[i] = i;
        for (int c = 0; c < C; ++c) {
            std::swap(order[c], order[c + rng.below(static_cast<uint64_t>(n - c))]);
            std::copy_n(&residual[static_cast<std::size_t>(order[c]) * gd], gd, W(s, c));
        }
        update_norms(s);
        for (std::size_t i = 0; i < N; ++i) {
            const int a =
                commvq_nearest(&residual[i * gd], &words_t[s * C * gd], &norms[s * C], C, gd);
            assign[s * N + i] = a;
            for (int j = 0; j < gd; ++j) residual[i * gd + j] -= W(s, a)[j];
        }
        for (int it = 0; it < opt.init_iterations; ++it) em_step(s);
    }
    std::vector<double> history{objective()};

    for (int sweep = 0; sweep < opt.em_sweeps; ++sweep) {
        for (int s = 0; s < stages; ++s) em_step(s);
        // Re-derive the residual from the codes so float drift cannot accumulate.
        for (std::size_t i = 0; i < N; ++i)
            for (int j = 0; j < gd; ++j) {
                float e = x[i * gd + j];
                for (int s = 0; s < stages; ++s) e -= W(s, assign[s * N + i])[j];
                residual[i * gd + j] = e;
            }
        history.push_back(objective());
    }
    return history;
}

}  // namespace

CommVQHeadFit fit_commvq_head(const float* keys, int n, int d, int bits, uint64_t seed,
                              const CommVQFitOptions& opt) {
    const int C = opt.codewords, gd = 2 * opt.group_pairs, ib = log2_exact(C);
    if (ib < 1 || C > 256)
        throw std::invalid_argument(
            "commvq calibration: codewords must be a power of two in 2..256, got " + str(C));
    if (opt.group_pairs < 1)
        throw std::invalid_argument("commvq calibration: group_pairs must be >= 1");
    if (opt.init_iterations < 0 || opt.em_sweeps < 0)
        throw std::invalid_argument(
            "commvq calibration: init_iterations and em_sweeps must be >= 0");
    if (bits < 1 || bits > 8)
        throw std::invalid_argument("commvq calibration: bits must be in 1..8, got " + str(bits));
    if (d < gd || d % gd != 0)
        throw std::invalid_argument("commvq calibration: head_dim " + str(d) +
                                    " must be a multiple of the group size " + str(gd));
    if ((bits * gd) % ib != 0)
        throw std::invalid_argument("commvq calibration: bits " + str(bits) + " x group_dim " +
                                    str(gd) + " is not a whole number of " + str(ib) +
                                    "-bit stage indices");
    if (n < C)
        throw std::invalid_argument("commvq calibration: " + str(n) +
                                    " key samples; need at least " + str(C) +
                                    " (one per codeword)");
    if (keys == nullptr) throw std::invalid_argument("commvq calibration: null keys");
    for (long long i = 0; i < static_cast<long long>(n) * d; ++i)
        if (!std::isfinite(keys[i]))
            throw std::invalid_argument("commvq calibration: keys contain NaN or Inf");

    CommVQHeadFit fit;
    fit.stages = bits * gd / ib;
    fit.groups = d / gd;
    fit.codewords = C;
    fit.group_dim = gd;
    const std::size_t per_stage_group = static_cast<std::size_t>(C) * gd;
    std::vector<std::vector<float>> group_words(fit.groups);
    std::vector<std::vector<double>> group_hist(fit.groups);
    ParallelErrors errors;
#pragma omp parallel for schedule(dynamic)
    for (int g = 0; g < fit.groups; ++g) {
        errors.run(g, [&] {
            std::vector<float> x(static_cast<std::size_t>(n) * gd);
            for (int i = 0; i < n; ++i)
                std::copy_n(keys + static_cast<std::size_t>(i) * d + g * gd, gd,
                            &x[static_cast<std::size_t>(i) * gd]);
            group_words[g].resize(fit.stages * per_stage_group);
            group_hist[g] =
                fit_group(x, n, gd, fit.stages, C, seed ^ (0xC2B2AE3D27D4EB4FULL * (g + 1)), opt,
                          group_words[g].data());
        });
    }
    errors.rethrow();
    fit.codebook.resize(static_cast<std::size_t>(fit.stages) * fit.groups * per_stage_group);
    for (int s = 0; s < fit.stages; ++s)
        for (int g = 0; g < fit.groups; ++g)
            std::copy_n(
                &group_words[g][s * per_stage_group], per_stage_group,
                &fit.codebook[(static_cast<std::size_t>(s) * fit.groups + g) * per_stage_group]);
    fit.objective_history.assign(opt.em_sweeps + 1, 0.0);
    for (int g = 0; g < fit.groups; ++g)  // fixed order: the same sum for any thread count
        for (int k = 0; k <= opt.em_sweeps; ++k) fit.objective_history[k] += group_hist[g][k];
    return fit;
}

CommVQCalibration calibrate_commvq(const Activations& acts, int bits, uint64_t seed) {
    if (bits < 1 || bits > 4)
        throw std::invalid_argument("calibrate_commvq: bits must be in 1..4, got " + str(bits));
    if (acts.layers.empty())
        throw std::invalid_argument("calibrate_commvq: the activations have no layers");
    const int L = static_cast<int>(acts.layers.size());
    const int H = static_cast<int>(acts.layers[0].keys.size());
    if (H < 1) throw std::invalid_argument("calibrate_commvq: layer 0 has no key samples");
    const int d = acts.layers[0].keys[0].dim;
    const CommVQFitOptions opt;
    for (int l = 0; l < L; ++l) {
        const auto& keys = acts.layers[l].keys;
        if (static_cast<int>(keys.size()) != H)
            throw std::invalid_argument("calibrate_commvq: layer " + str(l) + " has " +
                                        str(keys.size()) + " KV heads of keys, layer 0 has " +
                                        str(H));
        for (int h = 0; h < H; ++h) {
            const HeadSamples& hs = keys[h];
            const std::string where = "calibrate_commvq: layer " + str(l) + " head " + str(h);
            if (hs.dim != d)
                throw std::invalid_argument(where + " has head_dim " + str(hs.dim) + ", expected " +
                                            str(d));
            if (hs.data.size() % static_cast<std::size_t>(std::max(d, 1)) != 0)
                throw std::invalid_argument(where + ": key data is not a whole number of rows");
            if (hs.count() < opt.codewords)
                throw std::invalid_argument(where + " has " + str(hs.count()) +
                                            " key samples; need at least " + str(opt.codewords) +
                                            " (one per codeword)");
            for (float v : hs.data)
                if (!std::isfinite(v))
                    throw std::invalid_argument(where + ": keys contain NaN or Inf");
            if (!acts.rope.inv_freq.empty()) {
                if (static_cast<int64_t>(hs.positions.size()) != hs.count())
                    throw std::invalid_argument(where + ": " + str(hs.positions.size()) +
                                                " positions for " + str(hs.count()) + " keys");
                for (int32_t p : hs.positions)
                    if (p < 0)
                        throw std::invalid_argument(where +
                                                    ": a key has no position (RoPE is known)");
            }
        }
    }
    if (static_cast<int>(acts.rope.inv_freq.size()) > d / 2)
        throw std::invalid_argument("calibrate_commvq: acts.rope.inv_freq has " +
                                    str(acts.rope.inv_freq.size()) + " frequencies for head_dim " +
                                    str(d));
    const int gd = 2 * opt.group_pairs;
    if (d < gd || d % gd != 0)
        throw std::invalid_argument("calibrate_commvq: head_dim " + str(d) +
                                    " must be a multiple of " + str(gd));

    CommVQCalibration out;
    out.num_codebooks = bits;  // 8-bit indices over 8 coordinates: one stage per bit
    const std::size_t per_head = static_cast<std::size_t>(bits) * d * opt.codewords;
    out.codebook.shape = {L, H, bits, d / gd, opt.codewords, gd};
    out.codebook.data.assign(per_head * L * H, 0.0f);
    // Heads in parallel (each fit's inner loops then run on one thread).
    ParallelErrors errors;
#pragma omp parallel for schedule(dynamic)
    for (int lh = 0; lh < L * H; ++lh) {
        errors.run(lh, [&] {
            const int l = lh / H, h = lh % H;
            const HeadSamples& hs = acts.layers[l].keys[h];
            std::vector<float> x(hs.data);
            if (!acts.rope.inv_freq.empty())
                for (int64_t i = 0; i < hs.count(); ++i)
                    commvq_rope(&x[static_cast<std::size_t>(i) * d], d, acts.rope.inv_freq,
                                -static_cast<double>(hs.positions[i]));
            const CommVQHeadFit fit =
                fit_commvq_head(x.data(), static_cast<int>(hs.count()), d, bits,
                                derive_seed(seed, l, h, d, RandomPurpose::kKMeans), opt);
            std::copy(fit.codebook.begin(), fit.codebook.end(),
                      out.codebook.data.begin() + per_head * lh);
        });
    }
    errors.rethrow();
    return out;
}

}  // namespace veloxquant
