// RateQuant (arXiv 2605.06675) bit allocation lookup: a TurboQuant scalar codec whose bit width
// per layer or KV head comes from config.bit_allocation.
#pragma once

#include "veloxquant/config.h"

namespace veloxquant {

/// Bits for (layer, head): the entry "L.H" if present, else "L", else config.bits.
int ratequant_bits(const KVCacheConfig& config, int layer, int head);

}  // namespace veloxquant
