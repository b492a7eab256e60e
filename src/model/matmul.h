// Threaded products of quantized weight matrices with float activations, on the ggml formats as
// stored in GGUF (no repacking, no activation quantization).
//
// A weight matrix W has `rows` output features; each row is `cols` elements stored as consecutive
// ggml blocks (src/model/dequant.h). For n activation vectors x[t] (t < n, each `cols` floats)
// the products are y[t][r] = sum_c W[r][c] * x[t][c].
//
// Two kernels, both threaded over 16-row tiles of W with OpenMP (dynamic schedule):
//   * fewer than 4 vectors (decode): block-wise dot products straight on the blocks of Q4_0,
//     Q4_1, Q5_0, Q5_1 and Q8_0, whose values are all q * d + m within a block of 32, as
//     sum_b (d_b sum_j q_bj x_j + m_b sum_j x_j) with the block sums of x computed once per call
//     (llama.cpp's Q4_1 x Q8_1 dot has the same shape, on integer activations); F32, F16 and the
//     other dequantizable types (K-quants, BF16) dequantize one row into L1 and take float dots;
//   * 4 or more vectors (prefill): each 16-row tile is dequantized once, transposed, and
//     multiplied with a few vectors at a time by an outer-product register tile (the BLIS
//     micro-kernel shape), so the dequantization is shared by every vector of the chunk.
// The kernels are written once over GCC/Clang vector extensions (no intrinsics) and instantiated
// for 128-bit vectors (any x86-64, i.e. SSE2; or another ISA's native width) and, on x86-64, also
// for AVX2+FMA and AVX-512 through the target attribute; the best set the CPU supports is picked
// at run time, so the binary stays portable (no -march flags; core/cpu_isa.h selects the set).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "model/gguf.h"

namespace veloxquant {

/// A read-only view of a 2-D ggml weight matrix: `rows` rows of `row_bytes` bytes each.
struct QMatrix {
    GGMLType type = GGMLType::F32;
    const uint8_t* data = nullptr;
    int64_t rows = 0;
    int64_t cols = 0;
    std::size_t row_bytes = 0;

    /// The matrix of a 2-D GGUF tensor (dims = {cols, rows}); throws std::invalid_argument naming
    /// the tensor when it is not 2-D or its type is not supported by matmul().
    static QMatrix from_tensor(const GGUFTensor& tensor);
    std::size_t nbytes() const { return row_bytes * static_cast<std::size_t>(rows); }
};

/// Whether matmul() handles weights of `type` (natively or by dequantizing rows).
bool matmul_supports(GGMLType type);

/// One output of a product: y[t * ldy + r] for t < n, r < w->rows.
struct MatmulOut {
    const QMatrix* w;
    float* y;
    int64_t ldy;
};

/// y = W x for each of `n_outs` matrices that share the input x[t * ldx + c] (t < n, c < cols),
/// all in one parallel region (e.g. the Q, K and V projections). Every matrix must have the
/// input's column count; throws std::invalid_argument otherwise or for n < 1.
void matmul(const MatmulOut* outs, int n_outs, const float* x, int64_t ldx, int n);

/// Single-matrix convenience form: x is [n][w.cols], y is [n][w.rows], both dense.
void matmul(const QMatrix& w, const float* x, int n, float* y);

}  // namespace veloxquant
