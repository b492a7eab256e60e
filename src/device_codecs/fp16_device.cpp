#include "device_codecs/fp16_device.h"

#include <stdexcept>
#include <string>

#include "methods/fp16_codec.h"

namespace veloxquant::dev {

Fp16Device::Params Fp16Device::build(const KeyCodec& cpu, ParamArena& /*arena*/) {
    if (dynamic_cast<const FP16Codec*>(&cpu) == nullptr)
        throw std::invalid_argument("Fp16Device: not an fp16 codec");
    if (cpu.dim() > kMaxDim)
        throw std::invalid_argument("device codecs take head_dim <= 256, got " +
                                    std::to_string(cpu.dim()));
    Params p;
    p.d = cpu.dim();
    return p;
}

}  // namespace veloxquant::dev
