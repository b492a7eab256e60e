#include "device_codecs/rabitq_device.h"

#include <stdexcept>
#include <string>

#include "methods/rabitq.h"

namespace veloxquant::dev {

RaBitQDevice::Params RaBitQDevice::build(const KeyCodec& cpu, ParamArena& arena) {
    const auto* rq = dynamic_cast<const RaBitQCodec*>(&cpu);
    if (rq == nullptr) throw std::invalid_argument("RaBitQDevice: not a rabitq codec");
    if (rq->needs_training())
        throw std::invalid_argument("rabitq: train before building the device codec");
    if (rq->dim() > kMaxDim)
        throw std::invalid_argument("device codecs take head_dim <= 256, got " +
                                    std::to_string(rq->dim()));
    Params p;
    p.d = rq->dim();
    p.bits = rq->bits();
    p.clusters = rq->trained_clusters();
    p.id_bytes = static_cast<int>(rq->id_bytes());
    if (state_floats(p) > kMaxStateFloats)
        throw std::invalid_argument("rabitq device codec: head_dim + centroids must be <= " +
                                    std::to_string(kMaxStateFloats) +
                                    " (the per-query state lives in shared memory), got " +
                                    std::to_string(p.d) + " + " + std::to_string(p.clusters));
    p.rotation = build_rotation(rq->rotation(), arena);
    p.centroids = arena.add(rq->centroids().data(), static_cast<std::size_t>(p.clusters) * p.d);
    return p;
}

}  // namespace veloxquant::dev
