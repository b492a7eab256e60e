#include "device_codecs/qjl_device.h"

#include <stdexcept>
#include <string>

#include "methods/qjl.h"

namespace veloxquant::dev {
namespace {

constexpr double kSqrtHalfPi = 1.2533141373155002512;  // sqrt(pi / 2), as QJLCodec

}  // namespace

QjlDevice::Params QjlDevice::build(const KeyCodec& cpu, ParamArena& arena) {
    const auto* qjl = dynamic_cast<const QJLCodec*>(&cpu);
    if (qjl == nullptr) throw std::invalid_argument("QjlDevice: not a qjl codec");
    if (qjl->dim() > kMaxDim)
        throw std::invalid_argument("device codecs take head_dim <= 256, got " +
                                    std::to_string(qjl->dim()));
    Params p;
    p.d = qjl->dim();
    p.m = qjl->sketch_dim();
    p.scale = kSqrtHalfPi / p.m;
    p.sketch = arena.add(qjl->sketch());
    return p;
}

}  // namespace veloxquant::dev
