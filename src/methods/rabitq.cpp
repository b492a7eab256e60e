#include "methods/rabitq.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

#include "core/bitpack.h"
#include "core/kmeans.h"
#include "core/rng.h"
#include "methods/byte_table_sums.h"
#include "methods/nibble_table_sums.h"

namespace veloxquant {
namespace {

constexpr int kMaxDim = 1024;
constexpr int kMaxClusters = 65536;

// Reused buffers of one encode call.
struct QuantizeScratch {
    std::vector<double> residual;
    std::vector<int> steps;
    std::vector<std::pair<double, int>> events, unsorted;
    std::vector<int> bucket_start, cursor;
};

// The critical values t = s/|e_j| (s = 1..m-1, t <= t_max) as (t, j) pairs in increasing order.
// A counting sort into as many equal-width buckets as there are events (the bucket is monotone
// in t), then a sort inside each small bucket: O(events) expected instead of a full sort.
void critical_values(int m, double t_max, QuantizeScratch& sc) {
    auto& raw = sc.unsorted;
    raw.clear();
    const int d = static_cast<int>(sc.residual.size());
    for (int j = 0; j < d; ++j) {
        const double a = std::fabs(sc.residual[j]);
        for (int s = 1; s < m && s <= t_max * a; ++s) raw.emplace_back(s / a, j);
    }
    const std::size_t n = raw.size();
    const double per_t = static_cast<double>(n) / t_max;
    auto bucket = [&](double t) { return std::min(n - 1, static_cast<std::size_t>(t * per_t)); };
    sc.bucket_start.assign(n + 1, 0);
    for (const auto& ev : raw) ++sc.bucket_start[bucket(ev.first) + 1];
    for (std::size_t b = 0; b < n; ++b) sc.bucket_start[b + 1] += sc.bucket_start[b];
    sc.events.resize(n);
    sc.cursor.assign(sc.bucket_start.begin(), sc.bucket_start.end());
    for (const auto& ev : raw) sc.events[sc.cursor[bucket(ev.first)]++] = ev;
    for (std::size_t b = 0; b < n; ++b) {
        const auto first = sc.events.begin() + sc.bucket_start[b];
        std::sort(first, sc.events.begin() + sc.bucket_start[b + 1]);
    }
}

// Levels u[d] and factor f of the rotated key x against its nearest centroid (RaBitQ with the
// extended-RaBitQ code search for B > 1); returns the cluster id.
//
// Grid point j is x_bar_j = u_j - (2^B - 1)/2 = sign(e_j) (s_j + 1/2) with s_j in 0..M-1,
// M = 2^(B-1): a grid point of the sign of e_j always has the larger inner product at the same
// norm. The s maximising the cosine <x_bar, |e|>/||x_bar|| is the grid point nearest to t |e|
// for some t > 0 (extended RaBitQ, arXiv 2409.09913 §3.2), i.e. s_j = min(floor(t |e_j|), M-1).
// As t grows, s_j steps up at the critical values t = (s+1)/|e_j|; visiting them in order and
// keeping the best cosine is an exact search.
int quantize(const float* x, const std::vector<float>& centroids, const CentroidSearch& search,
             int d, int bits, uint8_t* levels, float* f, QuantizeScratch& sc) {
    const int cid = search.nearest(x);
    const float* c = &centroids[static_cast<std::size_t>(cid) * d];
    sc.residual.resize(d);
    double norm2 = 0.0, abs_sum = 0.0;
    for (int j = 0; j < d; ++j) {
        sc.residual[j] = static_cast<double>(x[j]) - c[j];
        norm2 += sc.residual[j] * sc.residual[j];
        abs_sum += std::fabs(sc.residual[j]);
    }
    const int m = 1 << (bits - 1);
    sc.steps.assign(d, 0);
    if (norm2 > 0.0 && m > 1) {
        // The optimum's t is at most (M - 1/2) d / ||e||_1: its cosine is at least the
        // all-ones code's, ||e||_1 / (sqrt(d) ||e||), and its norm at most (M - 1/2) sqrt(d).
        critical_values(m, (m - 0.5) * d / abs_sum * (1.0 + 1e-9), sc);
        double ip = 0.5 * abs_sum;  // <s + 1/2, |e|>
        double nn = 0.25 * d;       // ||s + 1/2||^2
        double best = ip * ip / nn;
        std::size_t best_len = 0;
        for (std::size_t i = 0; i < sc.events.size(); ++i) {
            const int j = sc.events[i].second;
            ip += std::fabs(sc.residual[j]);
            nn += 2.0 * sc.steps[j] + 2.0;  // (s + 3/2)^2 - (s + 1/2)^2
            ++sc.steps[j];
            if (ip * ip > best * nn) {
                best = ip * ip / nn;
                best_len = i + 1;
            }
        }
        std::fill(sc.steps.begin(), sc.steps.end(), 0);
        for (std::size_t i = 0; i < best_len; ++i) ++sc.steps[sc.events[i].second];
    }
    double xe = 0.0;  // <x_bar, e>
    for (int j = 0; j < d; ++j) {
        const int s = sc.steps[j];
        const bool pos = sc.residual[j] >= 0.0;
        levels[j] = static_cast<uint8_t>(pos ? m + s : m - 1 - s);
        xe += (s + 0.5) * std::fabs(sc.residual[j]);
    }
    // f = ||e|| / <o_bar, o> / ||x_bar||; e = 0 (a key on its centroid) decodes to c exactly.
    *f = norm2 > 0.0 ? static_cast<float>(norm2 / xe) : 0.0f;
    return cid;
}

// <u, q'> for packed B-bit levels u. Eight coordinates span exactly B bytes, read as one
// little-endian word, with one partial sum per lane (fixed order, no long add chain); the tail
// goes through read_packed.
template <int B>
float dot_levels(const uint8_t* packed, const float* q, int d) {
    constexpr uint64_t kMask = (1u << B) - 1u;
    float part[8] = {};
    int j = 0;
    for (; j + 8 <= d; j += 8) {
        const uint8_t* group = packed + (j / 8) * B;
        uint64_t word = 0;
        for (int b = 0; b < B; ++b) word |= static_cast<uint64_t>(group[b]) << (8 * b);
        for (int i = 0; i < 8; ++i)
            part[i] += static_cast<float>((word >> (i * B)) & kMask) * q[j + i];
    }
    float s = 0.0f;
    for (; j < d; ++j) s += static_cast<float>(read_packed(packed, j, B)) * q[j];
    for (float p : part) s += p;
    return s;
}

using DotLevels = float (*)(const uint8_t*, const float*, int);

// Widths without a byte lookup table (those whose codes straddle bytes, and 8).
DotLevels dot_levels_for(int bits) {
    switch (bits) {
        case 3:
            return dot_levels<3>;
        case 5:
            return dot_levels<5>;
        case 6:
            return dot_levels<6>;
        case 7:
            return dot_levels<7>;
        default:
            return dot_levels<8>;
    }
}

}  // namespace

RaBitQCodec::RaBitQCodec(int d, int bits, int num_clusters, bool use_hadamard, uint64_t seed,
                         const float* centroids)
    : KeyCodec(d), bits_(bits), num_clusters_(num_clusters), seed_(seed) {
    if (d < 2 || d > kMaxDim)
        throw std::invalid_argument("rabitq: head dim must be in 2..1024, got " +
                                    std::to_string(d));
    if (bits < 1 || bits > 8)
        throw std::invalid_argument("rabitq: bits must be in 1..8, got " + std::to_string(bits));
    if (num_clusters < 1 || num_clusters > kMaxClusters)
        throw std::invalid_argument(
            "rabitq: num_clusters must be in 1..65536 (cluster ids take at most 2 bytes), got " +
            std::to_string(num_clusters));
    rotation_ = Rotation(d, use_hadamard, seed);
    if (centroids != nullptr) {
        centroids_.resize(static_cast<std::size_t>(num_clusters) * d);
        for (int c = 0; c < num_clusters; ++c)
            rotation_.forward(centroids + static_cast<std::size_t>(c) * d,
                              &centroids_[static_cast<std::size_t>(c) * d]);
        trained_k_ = num_clusters;
    }
}

const float* rabitq_calibrated_centroids(const KVCacheConfig& config, int layer, int head, int d) {
    const FloatArray& a = config.ivf_centroids;
    if (a.empty() && a.shape.empty()) return nullptr;
    const auto& s = a.shape;
    auto shape_text = [&s] {
        std::string t = "[";
        for (std::size_t i = 0; i < s.size(); ++i) t += (i ? "," : "") + std::to_string(s[i]);
        return t + "]";
    };
    if (s.size() != 4 || s[2] != config.num_clusters || s[3] != d || layer >= s[0] ||
        head >= s[1] || static_cast<int64_t>(a.data.size()) != s[0] * s[1] * s[2] * s[3])
        throw std::invalid_argument(
            "KVCacheConfig.ivf_centroids has shape " + shape_text() + " with " +
            std::to_string(a.data.size()) + " values; layer " + std::to_string(layer) + " head " +
            std::to_string(head) + " needs [layers > " + std::to_string(layer) + "][heads > " +
            std::to_string(head) + "][num_clusters = " + std::to_string(config.num_clusters) +
            "][head_dim = " + std::to_string(d) + "]");
    const float* slice =
        a.data.data() + (static_cast<std::size_t>(layer) * s[1] + head) * s[2] * s[3];
    for (int64_t i = 0; i < s[2] * s[3]; ++i)
        if (!std::isfinite(slice[i]))
            throw std::invalid_argument(
                "KVCacheConfig.ivf_centroids holds a non-finite value (layer " +
                std::to_string(layer) + ", head " + std::to_string(head) + ")");
    return slice;
}

std::size_t RaBitQCodec::code_bytes() const {
    return id_bytes() + packed_bytes(dim(), bits_);
}

namespace {
constexpr int kTrainPointsPerCluster = 32;
}  // namespace

int RaBitQCodec::training_rows(int n) const {
    // A long first prefill is subsampled (evenly spaced) to kTrainPointsPerCluster points per
    // centroid, as FAISS caps its k-means training sets: more points barely move centroids.
    return std::min(n, kTrainPointsPerCluster * num_clusters_);
}

RaBitQCodec::KMeansProblem RaBitQCodec::kmeans_problem(int n) const {
    if (n < 1) throw std::invalid_argument("rabitq: train needs at least one key");
    KMeansProblem p;
    p.n = training_rows(n);
    p.k = std::min(num_clusters_, p.n);
    p.seed = derive_seed(seed_, 0, 0, dim(), RandomPurpose::kKMeans);
    return p;
}

void RaBitQCodec::rotated_training_rows(const float* keys, int n, float* points) const {
    const int d = dim(), m = training_rows(n);
    for (int i = 0; i < m; ++i)
        rotation_.forward(keys + static_cast<std::size_t>(training_row(i, n, m)) * d,
                          points + static_cast<std::size_t>(i) * d);
}

void RaBitQCodec::adopt_centroids(std::vector<float> centroids, int k) {
    if (k < 1 || k > num_clusters_ ||
        centroids.size() != static_cast<std::size_t>(k) * static_cast<std::size_t>(dim()))
        throw std::invalid_argument("rabitq: adopt_centroids takes [k][" + std::to_string(dim()) +
                                    "] floats with k in 1.." + std::to_string(num_clusters_) +
                                    ", got k=" + std::to_string(k) + " and " +
                                    std::to_string(centroids.size()) + " floats");
    centroids_ = std::move(centroids);
    trained_k_ = k;
}

void RaBitQCodec::train(const float* keys, int n) {
    const KMeansProblem p = kmeans_problem(n);
    std::vector<float> points(static_cast<std::size_t>(p.n) * dim());
    rotated_training_rows(keys, n, points.data());
    KMeansResult km = kmeans(points.data(), p.n, dim(), p.k, p.seed);
    adopt_centroids(std::move(km.centroids), km.k);
}

void RaBitQCodec::forget_training() noexcept {
    centroids_.clear();
    trained_k_ = 0;
}

void RaBitQCodec::require_trained(const char* what) const {
    if (trained_k_ == 0)
        throw std::logic_error(std::string("rabitq: ") + what +
                               " before train(): the IVF centroids are not learned yet");
}

int RaBitQCodec::read_cluster(const uint8_t* code) const {
    const int cid = id_bytes() == 1 ? code[0] : code[0] | (code[1] << 8);
    if (cid >= trained_k_)
        throw std::runtime_error("rabitq: cluster id " + std::to_string(cid) + " out of range (" +
                                 std::to_string(trained_k_) + " centroids): corrupted codes");
    return cid;
}

// One scalar per token, so scalar 0 of token t sits at scalars[t] whatever the stride.
void RaBitQCodec::encode(const float* keys, int n, uint8_t* codes, float* scalars,
                         std::size_t /*scalar_stride*/) const {
    require_trained("encode");
    const int d = dim();
    const std::size_t cb = code_bytes();
    std::vector<float> x(d);
    std::vector<uint8_t> levels(d);
    QuantizeScratch scratch;
    const CentroidSearch search(centroids_.data(), trained_k_, d);
    for (int t = 0; t < n; ++t) {
        rotation_.forward(keys + static_cast<std::size_t>(t) * d, x.data());
        const int cid =
            quantize(x.data(), centroids_, search, d, bits_, levels.data(), &scalars[t], scratch);
        uint8_t* code = codes + static_cast<std::size_t>(t) * cb;
        code[0] = static_cast<uint8_t>(cid & 0xFF);
        if (id_bytes() == 2) code[1] = static_cast<uint8_t>(cid >> 8);
        pack_bits(levels.data(), d, bits_, code + id_bytes());
    }
}

void RaBitQCodec::decode(const uint8_t* codes, const float* scalars, std::size_t /*stride*/, int n,
                         float* keys) const {
    require_trained("decode");
    const int d = dim();
    const std::size_t cb = code_bytes();
    const float offset = 0.5f * static_cast<float>((1 << bits_) - 1);
    for (int t = 0; t < n; ++t) {
        const uint8_t* code = codes + static_cast<std::size_t>(t) * cb;
        const float* c = &centroids_[static_cast<std::size_t>(read_cluster(code)) * d];
        const uint8_t* packed = code + id_bytes();
        float* out = keys + static_cast<std::size_t>(t) * d;
        for (int j = 0; j < d; ++j)
            out[j] =
                c[j] + scalars[t] * (static_cast<float>(read_packed(packed, j, bits_)) - offset);
        rotation_.inverse(out, out);
    }
}

// State layout: q' [d], sum_j q'_j [1], <q', c> per centroid [num_clusters], then for 1, 2
// and 4 bits the tables' kind [1] and the tables of <x_bar, q'> restricted to a part of the
// code: 16-entry tables per 4-bit half byte where nibble_table_sums has a SIMD build (as
// turboquant_rvq), else 256-entry tables per byte (byte_table_sums). The byte tables are larger.
std::size_t RaBitQCodec::query_state_size() const {
    const std::size_t lut = uses_lut() ? 1 + packed_bytes(dim(), bits_) * 256 : 0;
    return static_cast<std::size_t>(dim()) + 1 + num_clusters_ + lut;
}

void RaBitQCodec::prepare_query(const float* query, float* state) const {
    require_trained("prepare_query");
    const int d = dim();
    float* q = state;
    rotation_.forward(query, q);
    double sum = 0.0;
    for (int j = 0; j < d; ++j) sum += q[j];
    state[d] = static_cast<float>(sum);
    float* qc = state + d + 1;
    for (int c = 0; c < num_clusters_; ++c) {
        double acc = 0.0;
        if (c < trained_k_) {
            const float* cen = &centroids_[static_cast<std::size_t>(c) * d];
            for (int j = 0; j < d; ++j) acc += static_cast<double>(q[j]) * cen[j];
        }
        qc[c] = static_cast<float>(acc);
    }
    if (!uses_lut()) return;
    const bool nibbles = nibble_tables_are_faster();
    qc[num_clusters_] = nibbles ? 1.0f : 0.0f;
    // A table covers `group` coordinates: a nibble's or a byte's worth.
    const int group = (nibbles ? 4 : 8) / bits_;
    const int levels = 1 << bits_;
    const float offset = 0.5f * static_cast<float>(levels - 1);
    const std::size_t tables = (nibbles ? 2 : 1) * packed_bytes(d, bits_);
    const int entries = nibbles ? 16 : 256;
    float* lut = qc + num_clusters_ + 1;
    for (std::size_t p = 0; p < tables; ++p) {
        float* table = lut + p * entries;
        // Built one coordinate at a time: after coordinate i, entry v (v < levels^(i+1)) holds
        // the sum over the group's first i+1 coordinates. Descending v keeps the low entries
        // intact until they are read. Coordinates past d (tail padding) contribute zero.
        for (int i = 0; i < group; ++i) {
            const std::size_t j = p * group + i;
            const float qj = j < static_cast<std::size_t>(d) ? q[j] : 0.0f;
            const int low = 1 << (i * bits_);
            for (int v = low * levels - 1; v >= 0; --v) {
                const float term = (static_cast<float>(v / low) - offset) * qj;
                table[v] = (i == 0 ? 0.0f : table[v % low]) + term;
            }
        }
    }
}

void RaBitQCodec::score(const float* state, const uint8_t* codes, const float* scalars,
                        std::size_t scalar_stride, int n, float* scores) const {
    score_rows_at(state, 0, 1, codes, scalars, scalar_stride, n, 0, scores, 0);
}

void RaBitQCodec::score_rows_at(const float* states, std::size_t state_stride, int rows,
                                const uint8_t* codes, const float* scalars,
                                std::size_t /*scalar_stride*/, int n, int /*pos0*/, float* scores,
                                std::size_t score_stride) const {
    require_trained("score");
    const int d = dim();
    const std::size_t cb = code_bytes(), ib = id_bytes(), packed = packed_bytes(d, bits_);
    const std::size_t kind_at = static_cast<std::size_t>(d) + 1 + num_clusters_;  // then tables
    auto finish = [&](const float* state, float* row) {  // row holds <x_bar, q'> per token
        const float* qc = state + d + 1;
        for (int t = 0; t < n; ++t)
            row[t] =
                qc[read_cluster(codes + static_cast<std::size_t>(t) * cb)] + scalars[t] * row[t];
    };
    bool all_nibbles = uses_lut();
    for (int r = 0; r < rows && all_nibbles; ++r)
        all_nibbles = states[r * state_stride + kind_at] != 0.0f;
    if (all_nibbles) {  // the rows' nibbles taken out of the codes once
        nibble_table_sums(states + kind_at + 1, state_stride, rows, codes + ib, cb, packed, n,
                          scores, score_stride);
        for (int r = 0; r < rows; ++r) finish(states + r * state_stride, scores + r * score_stride);
        return;
    }
    for (int r = 0; r < rows; ++r) {
        const float* state = states + r * state_stride;
        float* row = scores + r * score_stride;
        if (uses_lut()) {
            byte_table_sums(state + kind_at + 1, codes + ib, cb, packed, n, 1, row);
        } else {
            // <x_bar, q'> = <u, q'> - (2^B - 1)/2 * sum_j q'_j.
            const float offset_sum = 0.5f * static_cast<float>((1 << bits_) - 1) * state[d];
            const DotLevels dot = dot_levels_for(bits_);
            for (int t = 0; t < n; ++t)
                row[t] = dot(codes + static_cast<std::size_t>(t) * cb + ib, state, d) - offset_sum;
        }
        finish(state, row);
    }
}

std::size_t RaBitQCodec::parameter_bytes() const {
    return rotation_.parameter_bytes() + centroids_.size() * sizeof(float);
}

void RaBitQCodec::save_state(BinaryWriter& out) const {
    out.put<int32_t>(dim());
    out.put<int32_t>(trained_k_);
    out.vec(centroids_);
}

void RaBitQCodec::load_state(BinaryReader& in) {
    const int32_t d = in.get<int32_t>();
    const int32_t k = in.get<int32_t>();
    if (d != dim())
        throw std::runtime_error("corrupted rabitq state: dim " + std::to_string(d) +
                                 " does not match the codec's " + std::to_string(dim()));
    if (k < 0 || k > num_clusters_)
        throw std::runtime_error("corrupted rabitq state: " + std::to_string(k) +
                                 " centroids, expected 0.." + std::to_string(num_clusters_));
    const std::size_t expected = static_cast<std::size_t>(k) * d;
    std::vector<float> centroids = in.vec<float>(expected);
    if (centroids.size() != expected)
        throw std::runtime_error("corrupted rabitq state: " + std::to_string(centroids.size()) +
                                 " centroid floats, expected " + std::to_string(expected));
    for (float v : centroids)
        if (!std::isfinite(v))
            throw std::runtime_error("corrupted rabitq state: non-finite centroid");
    centroids_ = std::move(centroids);
    trained_k_ = k;
}

void RaBitQCodec::check_codes(const uint8_t* codes, int n) const {
    if (n > 0 && trained_k_ == 0)
        throw std::runtime_error("corrupted rabitq codes: tokens stored without IVF centroids");
    for (int i = 0; i < n; ++i) read_cluster(codes + static_cast<std::size_t>(i) * code_bytes());
}

}  // namespace veloxquant
