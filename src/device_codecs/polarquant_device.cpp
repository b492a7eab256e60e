#include "device_codecs/polarquant_device.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "methods/polarquant.h"

namespace veloxquant::dev {

PolarQuantDevice::Params PolarQuantDevice::build(const KeyCodec& cpu, ParamArena& arena) {
    const auto* polar = dynamic_cast<const PolarQuantCodec*>(&cpu);
    if (polar == nullptr) throw std::invalid_argument("PolarQuantDevice: not a polarquant codec");
    if (polar->dim() > kMaxDim)
        throw std::invalid_argument("device codecs take head_dim <= 256, got " +
                                    std::to_string(polar->dim()));
    Params p;
    p.d = polar->dim();
    p.bits = polar->bits();
    p.level1_bytes = packed_size(p.d / 2, p.bits + 2);
    p.upper_bytes = packed_size(p.d / 4 + p.d / 8 + p.d / 16, p.bits);
    p.rotation = build_rotation(polar->rotation(), arena);
    std::vector<float> tables, boundaries;
    for (int level = 1; level <= kLevels; ++level) {
        const std::vector<float>& c = polar->centroid_cos(level);
        const std::vector<float>& s = polar->centroid_sin(level);
        const std::vector<float>& b = polar->codebook(level).boundaries;
        p.table_offset[level - 1] = static_cast<int>(tables.size());
        tables.insert(tables.end(), c.begin(), c.end());
        tables.insert(tables.end(), s.begin(), s.end());
        p.boundary_offset[level - 1] = static_cast<int>(boundaries.size());
        boundaries.insert(boundaries.end(), b.begin(), b.end());
    }
    p.table_floats = static_cast<int>(tables.size());
    p.tables = arena.add(tables);
    p.boundaries = arena.add(boundaries);
    return p;
}

}  // namespace veloxquant::dev
