#include "device_codecs/device_common.h"

#include "core/rotation.h"

namespace veloxquant::dev {

RotationParams build_rotation(const Rotation& rotation, ParamArena& arena) {
    RotationParams p;
    p.d = rotation.dim();
    p.hadamard = rotation.is_hadamard() ? 1 : 0;
    if (p.hadamard)
        p.signs = arena.add(rotation.signs());
    else
        p.matrix = arena.add(rotation.matrix());
    return p;
}

}  // namespace veloxquant::dev
