#include "device_codecs/tq_device.h"

#include <stdexcept>

#include "core/bitpack.h"
#include "methods/turboquant_rvq.h"

namespace veloxquant::dev {

TqDevice::Params TqDevice::build(const KeyCodec& cpu, ParamArena& arena) {
    const auto* tq = dynamic_cast<const TurboQuantRVQCodec*>(&cpu);
    if (tq == nullptr) throw std::invalid_argument("TqDevice: not a turboquant_rvq codec");
    if (tq->dim() > kMaxDim)
        throw std::invalid_argument("device codecs take head_dim <= 256, got " +
                                    std::to_string(tq->dim()));
    Params p;
    p.d = tq->dim();
    p.bits = tq->bits();
    p.stages = tq->num_residuals();
    p.stage_bytes = static_cast<int>(packed_bytes(p.d, p.bits));
    p.rotation = build_rotation(tq->rotation(), arena);
    p.centroids = arena.add(tq->centroids());
    p.boundaries = arena.add(tq->boundaries());
    return p;
}

}  // namespace veloxquant::dev
