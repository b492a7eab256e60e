#include "device_codecs/vecinfer_device.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "methods/vecinfer.h"

namespace veloxquant::dev {

VecInferDevice::Params VecInferDevice::build(const KeyCodec& cpu, ParamArena& arena) {
    const auto* vi = dynamic_cast<const VecInferCodec*>(&cpu);
    if (vi == nullptr) throw std::invalid_argument("VecInferDevice: not a vecinfer codec");
    if (vi->dim() > kMaxDim)
        throw std::invalid_argument("device codecs take head_dim <= 256, got " +
                                    std::to_string(vi->dim()));
    Params p;
    p.d = vi->dim();
    p.subspaces = vi->num_subspaces();
    p.codewords = vi->codewords();
    p.sub_dim = vi->sub_dim();
    p.code_bits = vi->code_bits();
    // The table only where the backend builds it in parallel (its affine form fits): built by
    // one thread per query row, a 64 x 256 table cost a decode step ~3 ms on the H200
    // (bench/cuda/decode_tuning.md), far more than reading each token's codewords.
    p.lut_state = static_cast<long long>(p.subspaces) * p.codewords * p.d <= kMaxAffineFloats;
    p.rotation = build_rotation(vi->rotation(), arena);
    p.codebook = arena.add(vi->codebook());
    for (const float w : vi->codebook()) p.largest_word = std::max(p.largest_word, std::fabs(w));
    p.half_norm2 = arena.add(vi->half_norm2());
    p.smooth = arena.add(vi->smooth_factors());
    p.inv_smooth = arena.add(vi->inv_smooth_factors());
    return p;
}

}  // namespace veloxquant::dev
