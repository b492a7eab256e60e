#include "device_codecs/spectral_device.h"

#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/lloyd_max.h"
#include "methods/spectral.h"

namespace veloxquant::dev {

SpectralDevice::Params SpectralDevice::build(const KeyCodec& cpu, ParamArena& arena) {
    const auto* spectral = dynamic_cast<const SpectralCodec*>(&cpu);
    if (spectral == nullptr) throw std::invalid_argument("SpectralDevice: not a spectral codec");
    if (spectral->dim() > kMaxDim)
        throw std::invalid_argument("device codecs take head_dim <= 256, got " +
                                    std::to_string(spectral->dim()));
    const int d = spectral->dim();
    const std::vector<int>& bits = spectral->coordinate_bits();
    const std::vector<double>& sigma = spectral->whitening_scales();
    const SpectralBasis& basis = spectral->basis();

    Params p;
    p.d = d;
    // The CPU code stream: coded directions by descending width, ascending r among equals.
    std::vector<int> coord;
    std::vector<double> slot_sigma;
    std::vector<float> slot_weight;
    int stream_bits = 0;
    for (int b = kMaxBits; b >= 1; --b)
        for (int r = 0; r < d; ++r) {
            if (bits[r] != b) continue;
            coord.push_back(r);
            slot_sigma.push_back(sigma[r]);
            slot_weight.push_back(basis.query_moments[r]);
            ++p.slots_of_width[b];
            stream_bits += b;
        }
    p.num_slots = static_cast<int>(coord.size());
    p.code_bytes = (stream_bits + 7) / 8;
    p.num_spreads = static_cast<int>(std::size(kSpectralSpreads));

    std::vector<float> centroids, boundaries;
    for (int b = 1; b <= kMaxBits; ++b) {
        const ScalarCodebook& cb = gaussian_codebook(b);
        centroids.insert(centroids.end(), cb.centroids.begin(), cb.centroids.end());
        boundaries.insert(boundaries.end(), cb.boundaries.begin(), cb.boundaries.end());
    }
    p.basis = arena.add(basis.basis);
    p.mean = arena.add(basis.mean);
    p.slot_coord = arena.add(coord);
    p.slot_sigma = arena.add(slot_sigma);
    p.slot_weight = arena.add(slot_weight);
    p.spreads = arena.add(kSpectralSpreads, std::size(kSpectralSpreads));
    p.centroids = arena.add(centroids);
    p.boundaries = arena.add(boundaries);
    return p;
}

}  // namespace veloxquant::dev
