#include "device_codecs/commvq_device.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "methods/commvq.h"

namespace veloxquant::dev {

CommVQDevice::Params CommVQDevice::build(const KeyCodec& cpu, ParamArena& arena) {
    const auto* cq = dynamic_cast<const CommVQCodec*>(&cpu);
    if (cq == nullptr) throw std::invalid_argument("CommVQDevice: not a commvq codec");
    if (cq->dim() > kMaxDim)
        throw std::invalid_argument("device codecs take head_dim <= 256, got " +
                                    std::to_string(cq->dim()));
    Params p;
    p.d = cq->dim();
    p.stages = cq->stages();
    p.groups = cq->groups();
    p.codewords = cq->codewords();
    p.group_dim = cq->group_dim();
    p.index_bits = cq->index_bits();
    p.pairs = static_cast<int>(cq->rope_inv_freq().size());
    // The phase table must be the one phase() reads: kPhaseBlock positions of every pair.
    if (cq->phase_steps().size() != static_cast<std::size_t>(kPhaseBlock) * p.pairs * 2)
        throw std::invalid_argument("CommVQDevice: the CPU codec's phase table is not 64 steps");
    p.words = arena.add(cq->codebook());
    for (const float w : cq->codebook()) p.largest_word = std::max(p.largest_word, std::fabs(w));
    p.norms2 = arena.add(cq->codeword_norms2());
    p.bounds = arena.add(cq->search_bounds());
    p.inv_freq = arena.add(cq->rope_inv_freq());
    p.steps = arena.add(cq->phase_steps());
    return p;
}

}  // namespace veloxquant::dev
