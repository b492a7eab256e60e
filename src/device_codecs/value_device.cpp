#include "device_codecs/value_device.h"

#include <stdexcept>
#include <string>

#include "methods/value_codec.h"

namespace veloxquant::dev {

ValueDevice::Params ValueDevice::build(const ValueCodec& cpu, ParamArena& arena) {
    if (cpu.dim() > kMaxDim)
        throw std::invalid_argument("device codecs take head_dim <= 256, got " +
                                    std::to_string(cpu.dim()));
    Params p;
    p.d = cpu.dim();
    p.bits = cpu.bits();
    if (p.bits == 16) return p;
    p.rotation = build_rotation(cpu.rotation(), arena);
    p.centroids = arena.add(cpu.codebook()->centroids);
    p.boundaries = arena.add(cpu.codebook()->boundaries);
    return p;
}

}  // namespace veloxquant::dev
