// The fp16 key "codec" (methods/fp16_codec.h) as a device codec: the uncompressed baseline on
// the generic device path. Keys are stored as IEEE half, little-endian, d per token.
#pragma once

#include "device_codecs/device_common.h"

namespace veloxquant {
class KeyCodec;
}

namespace veloxquant::dev {

struct Fp16Device {
    struct Params {
        int d = 0;
        void rebase(const uint8_t*) {}
    };

    /// Host: from an FP16Codec (throws std::invalid_argument for another codec).
    static Params build(const KeyCodec& cpu, ParamArena& arena);

    VQ_HD static int code_bytes(const Params& p) { return 2 * p.d; }
    VQ_HD static int num_scalars(const Params&) { return 0; }
    VQ_HD static int state_floats(const Params& p) { return p.d; }

    VQ_HD static void encode(const Params& p, const float* key, int /*pos*/, uint8_t* code,
                             float* /*scalars*/, int /*stride*/) {
        for (int j = 0; j < p.d; ++j) {
            const uint16_t h = float_to_half_bits(key[j]);
            code[2 * j] = static_cast<uint8_t>(h & 0xffu);
            code[2 * j + 1] = static_cast<uint8_t>(h >> 8);
        }
    }

    VQ_HD static float key_at(const uint8_t* code, int j) {
        return half_bits_to_float(static_cast<uint16_t>(code[2 * j] | (code[2 * j + 1] << 8)));
    }

    VQ_HD static void decode(const Params& p, const uint8_t* code, const float* /*scalars*/,
                             int /*stride*/, int /*pos*/, float* key) {
        for (int j = 0; j < p.d; ++j) key[j] = key_at(code, j);
    }

    VQ_HD static void prepare(const Params& p, const float* query, float* state) {
        for (int j = 0; j < p.d; ++j) state[j] = query[j];
    }

    // The feature form (device_common.h): the stored halves, read in place on the device.
    static constexpr int kFeatureGroup = 8;
    static constexpr bool kFeaturesInPlace = true;
    static constexpr bool kExactHalfFeatures = true;
    VQ_HD static int feature_offset(const Params&) { return 0; }
    VQ_HD static int feature_count(const Params& p) { return p.d; }
    VQ_HD static bool features_usable(const Params& p) { return p.d % 8 == 0; }
    VQ_HD static float feature_factor(const float*) { return 1.0f; }
    VQ_HD static int extra_entry(const Params&, const uint8_t*) { return -1; }
    VQ_HD static void features(const Params&, const uint8_t* code, int /*pos*/, int g, float* f) {
        for (int k = 0; k < 8; ++k) f[k] = key_at(code, 8 * g + k);
    }

    template <int R>
    VQ_HD static void score(const Params& p, const float* state, const uint8_t* code,
                            const float* /*scalars*/, int /*stride*/, int /*pos*/,
                            float (&out)[R]) {
        float acc[R] = {};
        for (int j = 0; j < p.d; ++j) fma_rows<R>(acc, key_at(code, j), state + j * R);
        for (int r = 0; r < R; ++r) out[r] = acc[r];
    }
};

}  // namespace veloxquant::dev
