// Calibration files: what the calibrated methods learned from one model's activations, with the
// model's fingerprint so that a file cannot be applied to another model.
//
// One file holds any of the sections (vecinfer, spectral, ratequant, commvq, rabitq); saving
// merges into an existing file of the same model, so several methods can be calibrated into one
// file. Files are versioned, CRC-checked and written atomically.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "veloxquant/config.h"
#include "veloxquant/factory.h"

namespace veloxquant {

/// What identifies a model: its attention shape, and a hash of its GGUF tensor table (names,
/// types, shapes) and of the first bytes of every tensor's data, so that a re-quantized or
/// fine-tuned model of the same architecture is told apart.
struct ModelFingerprint {
    std::string architecture;  ///< general.architecture, e.g. "llama"
    std::string name;          ///< general.name where the file has it, else ""
    ModelShape shape;          ///< KV heads and head dim per layer
    uint64_t tensor_hash = 0;

    /// E.g. "SmolLM2 135M Instruct (llama, 30 layers, 3 KV heads x 64, tensors 0x1a2b...)".
    std::string describe() const;
    bool operator==(const ModelFingerprint& o) const;
    bool operator!=(const ModelFingerprint& o) const { return !(*this == o); }
};

struct Calibration {
    ModelFingerprint model;
    /// RoPE of the model: pair i turns by pos * rope_inv_freq[i].
    std::vector<double> rope_inv_freq;

    struct VecInfer {
        FloatArray codebook;        ///< [L][H][S][C][sub_dim]
        FloatArray smooth_factors;  ///< [L][H][d]
        int num_subspaces = 0;
        int bits = 0;
    };
    struct Spectral {
        /// One per layer, [kv_heads][d + 3][d]: the eigenbasis rows, the eigenvalues, the mean,
        /// the query second moments (calibrate_spectral_rotation).
        std::vector<FloatArray> rotations;
    };
    struct RateQuant {
        std::map<std::string, int> bit_allocation;  ///< "L" or "L.H" -> bits
        double target_bits = 0.0;
        /// For reporting, one entry per allocation unit ("L" or "L.H", in `units` order):
        std::vector<std::string> units;
        std::vector<double> sensitivity;  ///< expected logit error per unit relative distortion
        std::vector<double> curve_a;      ///< D(b) = a * beta^-b, fitted
        std::vector<double> curve_beta;
    };
    struct CommVQ {
        FloatArray codebook;
        int num_codebooks = 0;
        int bits = 0;
    };
    struct RaBitQ {
        /// [L][H][clusters][d], in the key domain (not rotated): the codec rotates them with its
        /// own rotation, so one file serves any seed or rotation kind.
        FloatArray ivf_centroids;
        int num_clusters = 0;
    };

    std::optional<VecInfer> vecinfer;
    std::optional<Spectral> spectral;
    std::optional<RateQuant> ratequant;
    std::optional<CommVQ> commvq;
    std::optional<RaBitQ> rabitq;

    /// Names of the sections present, e.g. {"ratequant", "rabitq"}.
    std::vector<std::string> sections() const;

    /// Writes the file atomically. When `path` already holds a calibration of the same model,
    /// its sections that this object lacks are kept (sections present here replace theirs); a
    /// file of another model throws std::invalid_argument naming both models and is left alone.
    void save(const std::string& path) const;
    /// Reads a file written by save(); throws std::runtime_error naming the file and the problem
    /// for a missing, truncated, corrupted (CRC), forged (inconsistent content) or
    /// wrong-version file.
    static Calibration load(const std::string& path);
};

/// Throws std::invalid_argument naming both models unless the fingerprints are equal.
void check_calibration_model(const Calibration& calibration, const ModelFingerprint& model);
/// The same against a shape only (layer count, KV heads and head dim per layer).
void check_calibration_shape(const Calibration& calibration, const ModelShape& shape);

/// Fills the fields of config.method from the calibration:
///   vecinfer  -> codebook, smooth_factors, num_subspaces, bits (the codebook fixes the rate)
///   spectral  -> rotations
///   ratequant -> bit_allocation
///   commvq    -> codebook, num_subspaces (= num_codebooks), bits, rope_inv_freq
///   rabitq    -> ivf_centroids, num_clusters
/// Other methods take nothing and are left as they are. A missing section throws
/// std::invalid_argument naming the command and the C++ function that produce it.
void apply_calibration(const Calibration& calibration, KVCacheConfig& config);

}  // namespace veloxquant
