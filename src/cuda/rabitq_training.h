// rabitq's training on a device cache's first append, on the device: the rows the CPU codec's
// train() reads are gathered and rotated there (dev::rotate_forward, the CPU's Rotation::forward
// bit for bit: this file's kernels compile with --fmad=false), and every head's k-means runs at
// once on them (kmeans_on_device_points), so the keys never travel to the host and back. The
// codecs end trained exactly as RaBitQCodec::train() on the host copy of the keys leaves them.
#pragma once

#include <cuda_runtime.h>

#include <vector>

namespace veloxquant {
class KeyCodec;
}

namespace veloxquant::cuda {

/// Trains codecs (one a head, of one cache or of several) on device keys, codec i's
/// head_keys[i] [n_tokens][d], on `stream` (synchronized before the return), all in one k-means
/// call, where every codec is a RaBitQCodec that needs training and all pose the same k-means
/// shape (rows, clusters, dim); returns false, having done nothing, otherwise (the caller trains
/// them another way). Throws what the codecs' train() throws, std::runtime_error for a CUDA
/// error.
bool train_rabitq_on_device(const std::vector<KeyCodec*>& codecs,
                            const std::vector<const float*>& head_keys, int n_tokens,
                            cudaStream_t stream);

}  // namespace veloxquant::cuda
