// RaBitQ key codec (Gao & Long, arXiv 2405.12497; extended RaBitQ for bits > 1, Gao et al.,
// arXiv 2409.09913) with an IVF coarse quantizer.
//
// A key k is rotated, x = P k (P = Rotation, the paper's random orthogonal matrix), and split
// into its nearest IVF centroid c (k-means on rotated training keys) and the residual
// e = x - c with unit direction o = e/||e||. Each coordinate gets a B-bit level u_j whose grid
// point x_bar_j = u_j - (2^B - 1)/2 has the sign of o_j; for B = 1 that is the sign code, for
// B > 1 the levels maximise the cosine <x_bar, o>/||x_bar|| (extended RaBitQ). With
// o_bar = x_bar/||x_bar||, the paper's estimator of <q', x> for a rotated query q' = P q is
//     <q', c> + ||e|| <o_bar, q'> / <o_bar, o>
// which is unbiased over the random P (RaBitQ §3; the same symmetry argument covers extended
// RaBitQ). Per token we store the cluster id, the packed levels and one float
// f = ||e|| / (<o_bar, o> ||x_bar||) = ||e||^2 / <x_bar, e>, so that
//     score = <q', c> + f <x_bar, q'>,   decode: x_hat = c + f x_bar, k_hat = P^T x_hat.
// The paper stores ||e|| and <o_bar, o> separately; the estimate and the reconstruction only
// ever use their ratio, so one float holds exactly the same information in half the bytes.
// (For B = 1 the grid is +-1/2 rather than the paper's +-1/sqrt(d); f absorbs the constant.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/rotation.h"
#include "methods/key_codec.h"

namespace veloxquant {

class RaBitQCodec : public KeyCodec {
public:
    /// d in 2..1024, bits in 1..8, num_clusters in 1..65536 (else std::invalid_argument);
    /// seed already derived for (layer, head). With `centroids` ([num_clusters][d] in the key
    /// domain, e.g. from calibration) the codec is trained at once: it rotates them into its
    /// domain and never trains on the first prefill.
    RaBitQCodec(int d, int bits, int num_clusters, bool use_hadamard, uint64_t seed,
                const float* centroids = nullptr);

    int bits() const { return bits_; }
    int num_clusters() const { return num_clusters_; }
    /// Centroids learned by train(): min(num_clusters, n); 0 before training.
    int trained_clusters() const { return trained_k_; }
    /// Centroids in the rotated domain, [trained_clusters()][d].
    const std::vector<float>& centroids() const { return centroids_; }
    const Rotation& rotation() const { return rotation_; }
    /// Bytes of the cluster id at the start of each code: 1 if num_clusters <= 256, else 2.
    std::size_t id_bytes() const { return num_clusters_ <= 256 ? 1u : 2u; }

    std::size_t code_bytes() const override;
    int num_scalars() const override { return 1; }

    bool needs_training() const override { return trained_k_ == 0; }
    /// k-means with k = min(num_clusters, m) on the m = training_rows(n) rotated keys, seeded
    /// from the codec seed.
    void train(const float* keys, int n) override;
    /// The k-means problem train(keys, n) solves, for a caller that runs it elsewhere (the device
    /// cache, on the GPU): its points are rotated_training_rows(keys, n), n of them.
    struct KMeansProblem {
        int n = 0;  ///< training_rows(n)
        int k = 0;  ///< min(num_clusters, n)
        uint64_t seed = 0;
    };
    KMeansProblem kmeans_problem(int n) const;
    /// Writes points [kmeans_problem(n).n][d]: the rotated rows of keys [n][d] train() reads.
    void rotated_training_rows(const float* keys, int n, float* points) const;
    /// Ends a training: centroids [k][d] in the rotated domain, the k-means of
    /// kmeans_problem()'s points (k = its min(num_clusters, n)). std::invalid_argument for a size
    /// that does not fit.
    void adopt_centroids(std::vector<float> centroids, int k);
    void forget_training() noexcept override;
    /// At most 32 keys per centroid (evenly spaced).
    int training_rows(int n) const override;

    void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const override;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* keys) const override;

    std::size_t query_state_size() const override;
    void prepare_query(const float* query, float* state) const override;
    void score(const float* state, const uint8_t* codes, const float* scalars,
               std::size_t scalar_stride, int n, float* scores) const override;
    /// Rows whose states all hold nibble tables are scored together (nibble_table_sums).
    void score_rows_at(const float* states, std::size_t state_stride, int rows,
                       const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                       int pos0, float* scores, std::size_t score_stride) const override;

    std::size_t parameter_bytes() const override;
    void save_state(BinaryWriter& out) const override;
    void load_state(BinaryReader& in) override;
    void check_codes(const uint8_t* codes, int n) const override;

private:
    void require_trained(const char* what) const;
    int read_cluster(const uint8_t* code) const;
    // Lookup tables serve widths whose codes never straddle a nibble (1, 2, 4 bits).
    bool uses_lut() const { return bits_ == 1 || bits_ == 2 || bits_ == 4; }

    int bits_;
    int num_clusters_;
    uint64_t seed_;
    Rotation rotation_;
    int trained_k_ = 0;
    std::vector<float> centroids_;
};

/// The [layer][head] slice of config.ivf_centroids ([layers][heads][num_clusters][d], key
/// domain), or nullptr when the config has none. Throws std::invalid_argument naming
/// KVCacheConfig.ivf_centroids when its shape does not fit (layer, head, num_clusters, d) or it
/// holds a non-finite value.
const float* rabitq_calibrated_centroids(const KVCacheConfig& config, int layer, int head, int d);

}  // namespace veloxquant
