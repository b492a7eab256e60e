// KVCacheConfig: the seed's configuration dataclass, field for field, with validation.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace veloxquant {

class KeyNormObserver;

/// A dense float32 array with a shape (row-major), standing in for the seed's ndarray fields.
struct FloatArray {
    std::vector<float> data;
    std::vector<int64_t> shape;
    bool empty() const { return data.empty(); }
    /// Product of the shape's extents (1 for an empty shape), or -1 where an extent is negative
    /// or the product passes 2^62 (no array holds that many values): overflow-free, for shapes
    /// read from files.
    int64_t shape_size() const;
};

/// Names of every method the factory knows, in the seed's order.
const std::vector<std::string>& known_methods();

/// Quantization configuration (seed: veloxquant_mlx.cache.base.KVCacheConfig).
struct KVCacheConfig {
    std::string method;
    int bits = 1;               ///< key bits per coordinate
    int value_bits = 2;         ///< value bits per coordinate; 16 = fp16
    int num_residuals = 2;      ///< turboquant_rvq stages
    bool use_hadamard = true;   ///< randomized Walsh-Hadamard where d is a power of two
    FloatArray codebook;        ///< vecinfer product codebook [subspaces][codewords][sub_dim]
    FloatArray smooth_factors;  ///< vecinfer per-channel smoothing
    std::vector<FloatArray> rotations;                  ///< spectral per-layer bases
    std::map<std::string, int> bit_allocation;          ///< ratequant: "L" or "L.H" -> bits
    std::shared_ptr<KeyNormObserver> outlier_observer;  ///< enables the outlier side store
    int outlier_bits = 8;                               ///< 8 = int8, 16 = fp16 for outlier tokens
    int sketch_dim = 64;                                ///< qjl sketch rows
    int num_clusters = 64;                              ///< rabitq IVF centroids
    std::optional<int> num_subspaces;                   ///< vecinfer product-VQ subspaces
    bool use_fused_sdpa = true;  ///< attention on the codes (false: dequantize, then dense)
    // Extensions beyond the seed, filled from a calibration file (veloxquant/calibration.h):
    FloatArray ivf_centroids;  ///< rabitq: calibrated IVF centroids [layers][heads][clusters][d]
    std::vector<double> rope_inv_freq;  ///< commvq: the model's RoPE frequencies (pair i turns by
                                        ///< pos * rope_inv_freq[i]); empty = positions unknown
    /// Code keys minus a per-head mean that follows RoPE (methods/centered_key_codec.h):
    /// estimated from the first append, turned by rope_inv_freq where given (set them for a
    /// RoPE model, else the mean is taken as fixed after RoPE). For the codecs that learn their
    /// own key statistics elsewhere (commvq, vecinfer, spectral, calibrated rabitq centroids) it
    /// is refused. CPU caches only.
    bool center_keys = false;
    /// How RoPE pairs coordinates, for center_keys: pair i of rope_inv_freq is (i, i + P),
    /// P = rope_inv_freq.size() (transformers' rotate_half, llama.cpp's "neox"), instead of
    /// (2i, 2i + 1) (GGUF Llama models, llama.cpp's "normal"). commvq's RoPE-commuting
    /// codebooks take adjacent pairs only.
    bool rope_half_split = false;
    int signal_bits = 4;  ///< spectral bits for the signal coordinates
    int noise_bits = 1;   ///< spectral bits for the noise coordinates
    uint64_t seed = 0;

    /// Throws std::invalid_argument naming the offending field for an unknown method or an
    /// impossible setting. Head-dim constraints are checked by the factory, which knows d.
    void validate() const;

    /// Bits per stored value coordinate: 16 for the fp16 method, else value_bits.
    int stored_value_bits() const;
    /// Exclusive bounds on |key| and |value| coordinates that append accepts: infinity (any
    /// finite float) unless this config stores them in fp16 (the fp16 method, 16-bit values, an
    /// fp16 outlier side store), whose conversion turns magnitudes of 65520 and more into
    /// infinity.
    float key_bound() const;
    float value_bound() const;
};

}  // namespace veloxquant
