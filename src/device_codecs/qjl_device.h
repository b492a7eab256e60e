// qjl as a device codec. Mirrors QJLCodec (methods/qjl.h, Zandieh et al., arXiv 2406.03482):
// the code is the m bits sign(S k), scalar 0 is ||k||; the score is the paper's asymmetric
// estimator sqrt(pi/2)/m * ||k|| * <S q, sign(S k)>.
//
// Instead of the CPU's 256-float lookup table per code byte, the state is the m floats
// sqrt(pi/2)/m * (S q)_i, and score adds +state_i or -state_i per code bit: one broadcast read
// and one add per sketch row, with a state of m <= 8192 floats.
#pragma once

#include "device_codecs/device_common.h"

namespace veloxquant {
class KeyCodec;
}

namespace veloxquant::dev {

struct QjlDevice {
    struct Params {
        int d = 0;
        int m = 0;                      ///< sketch rows (code bits)
        double scale = 0.0;             ///< sqrt(pi/2) / m, in double as QJLCodec
        const float* sketch = nullptr;  ///< [m][d] row-major
        void rebase(const uint8_t* base) { dev::rebase(sketch, base); }
    };

    /// Host: from a QJLCodec (throws std::invalid_argument for another codec or d > kMaxDim).
    static Params build(const KeyCodec& cpu, ParamArena& arena);

    VQ_HD static int code_bytes(const Params& p) { return packed_size(p.m, 1); }
    VQ_HD static int num_scalars(const Params&) { return 1; }
    /// sqrt(pi/2)/m * S q, one float per sketch row.
    VQ_HD static int state_floats(const Params& p) { return p.m; }

    VQ_HD static void encode(const Params& p, const float* key, int /*pos*/, uint8_t* code,
                             float* scalars, int /*stride*/) {
        const int d = p.d;
        double norm2 = 0.0;
        for (int j = 0; j < d; ++j) norm2 += static_cast<double>(key[j]) * key[j];
        scalars[0] = static_cast<float>(sqrt(norm2));
        zero_bytes(code, code_bytes(p));
        for (int i = 0; i < p.m; ++i) {
            const float* row = p.sketch + static_cast<std::size_t>(i) * d;
            double acc = 0.0;
            for (int j = 0; j < d; ++j) acc += static_cast<double>(row[j]) * key[j];
            if (acc >= 0.0) code[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
        }
    }

    /// ||k|| sqrt(pi/2)/m * S^T sign(S k), accumulated row by row as QJLCodec::decode.
    VQ_HD static void decode(const Params& p, const uint8_t* code, const float* scalars,
                             int /*stride*/, int /*pos*/, float* key) {
        const int d = p.d;
        for (int j = 0; j < d; ++j) key[j] = 0.0f;
        for (int i = 0; i < p.m; ++i) {
            const float s = sign_of_bit(code, i);
            const float* row = p.sketch + static_cast<std::size_t>(i) * d;
            for (int j = 0; j < d; ++j) key[j] += s * row[j];
        }
        const float f = scalars[0] * static_cast<float>(p.scale);
        for (int j = 0; j < d; ++j) key[j] *= f;
    }

    VQ_HD static void prepare(const Params& p, const float* query, float* state) {
        for (int i = 0; i < p.m; ++i) {
            const float* row = p.sketch + static_cast<std::size_t>(i) * p.d;
            double acc = 0.0;
            for (int j = 0; j < p.d; ++j) acc += static_cast<double>(row[j]) * query[j];
            state[i] = static_cast<float>(p.scale * acc);
        }
    }

    template <int R>
    VQ_HD static void score(const Params& p, const float* state, const uint8_t* code,
                            const float* scalars, int /*stride*/, int /*pos*/, float (&out)[R]) {
        float acc[R] = {};
        FieldReader bits(code, code + code_bytes(p));
        for (int i = 0; i < p.m; ++i) fma_rows<R>(acc, bits.next(1) ? 1.0f : -1.0f, state + i * R);
        for (int r = 0; r < R; ++r) out[r] = scalars[0] * acc[r];
    }

    // The feature form (device_common.h): f_i = +1 or -1 by bit i, factor ||k||.
    static constexpr int kFeatureGroup = 8;
    static constexpr bool kExactHalfFeatures = true;
    VQ_HD static int feature_offset(const Params&) { return 0; }
    VQ_HD static int feature_count(const Params& p) { return p.m; }
    VQ_HD static bool features_usable(const Params& p) { return p.m % 8 == 0; }
    VQ_HD static float feature_factor(const float* scalars) { return scalars[0]; }
    VQ_HD static int extra_entry(const Params&, const uint8_t*) { return -1; }
    VQ_HD static void features(const Params&, const uint8_t* code, int /*pos*/, int g, float* f) {
        for (int k = 0; k < 8; ++k) f[k] = (code[g] >> k) & 1u ? 1.0f : -1.0f;
    }

private:
    /// +1 where bit i of the code is set ((S k)_i >= 0), else -1.
    VQ_HD static float sign_of_bit(const uint8_t* code, int i) {
        return (code[i >> 3] >> (i & 7)) & 1u ? 1.0f : -1.0f;
    }
};

}  // namespace veloxquant::dev
