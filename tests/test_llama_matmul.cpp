// Quantized matmul (src/model/matmul.h) on every weight format and CPU kernel set against the
// dequantized rows in double precision, the fused form with several outputs, and its errors.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "core/half.h"
#include "llama_test_helpers.h"
#include "model/dequant.h"
#include "model/gguf.h"
#include "model/matmul.h"

using namespace veloxquant;
using namespace llamatest;

// ---- Matmul on every weight format, every kernel set, both paths (dots and register tiles).

TEST(LlamaMatmul, AllFormatsMatchDequantizedReference) {
    std::mt19937 gen(3);
    for (const GGMLType type :
         {GGMLType::F32, GGMLType::F16, GGMLType::Q4_0, GGMLType::Q4_1, GGMLType::Q5_0,
          GGMLType::Q5_1, GGMLType::Q8_0, GGMLType::Q4_K, GGMLType::Q6_K, GGMLType::BF16}) {
        const int rows = 37, cols = ggml_block_size(type) == 256 ? 512 : 96;
        const std::size_t row_bytes = ggml_row_bytes(type, cols);
        std::vector<uint8_t> data(row_bytes * rows);
        for (auto& b : data) b = static_cast<uint8_t>(gen());
        // Random bytes everywhere, then sane values in the fp16 scale fields (and all of F16).
        const std::size_t block = ggml_type_size(type);
        auto set_half = [&](std::size_t at, float v) {
            const uint16_t h = float_to_half(v);
            std::memcpy(&data[at], &h, 2);
        };
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        if (type == GGMLType::F32) {
            for (std::size_t i = 0; i < data.size(); i += 4) {
                const float v = u(gen);
                std::memcpy(&data[i], &v, 4);
            }
        } else if (type == GGMLType::F16) {
            for (std::size_t i = 0; i < data.size(); i += 2) set_half(i, u(gen));
        } else if (type == GGMLType::BF16) {
            for (std::size_t i = 0; i < data.size(); i += 2) {
                const uint16_t h = float_to_bf16(u(gen));
                std::memcpy(&data[i], &h, 2);
            }
        } else if (type == GGMLType::Q6_K) {
            for (std::size_t b = 0; b < data.size(); b += block)
                set_half(b + block - 2, 0.01f * u(gen));
        } else {
            const bool has_min =
                type == GGMLType::Q4_1 || type == GGMLType::Q5_1 || type == GGMLType::Q4_K;
            for (std::size_t b = 0; b < data.size(); b += block) {
                set_half(b, 0.05f * u(gen));
                if (has_min) set_half(b + 2, 0.05f * u(gen));
            }
        }
        const QMatrix w{type, data.data(), rows, cols, row_bytes};
        Matrix wf(static_cast<std::size_t>(rows) * cols);
        for (int r = 0; r < rows; ++r)
            dequantize_row(type, data.data() + r * row_bytes, wf.data() + r * cols, cols);
        for (const std::string& isa : cpu_isas()) {
            use_cpu_isa(isa);
            for (const int n : {1, 2, 3, 4, 5, 9, 33}) {
                const Matrix x = randn(static_cast<std::size_t>(n) * cols, gen, 1.0f);
                std::vector<float> y(static_cast<std::size_t>(n) * rows), ref(y.size());
                matmul(w, x.data(), n, y.data());
                for (int t = 0; t < n; ++t)
                    for (int r = 0; r < rows; ++r) {
                        double s = 0.0;
                        for (int c = 0; c < cols; ++c)
                            s += static_cast<double>(wf[r * cols + c]) * x[t * cols + c];
                        ref[t * rows + r] = static_cast<float>(s);
                    }
                EXPECT_LT(max_rel(y, ref), 1e-5)
                    << ggml_type_name(type) << " n=" << n << " " << cpu_isa_name();
            }
        }
        use_cpu_isa("");
    }
}

TEST(LlamaMatmul, SharedInputOutputsAndShapeErrors) {
    std::mt19937 gen(5);
    const Quantized a = quantize(GGMLType::Q8_0, randn(20 * 64, gen, 1.0f));
    const Quantized b = quantize(GGMLType::Q4_1, randn(7 * 64, gen, 1.0f));
    const QMatrix wa{GGMLType::Q8_0, a.bytes.data(), 20, 64, ggml_row_bytes(GGMLType::Q8_0, 64)};
    const QMatrix wb{GGMLType::Q4_1, b.bytes.data(), 7, 64, ggml_row_bytes(GGMLType::Q4_1, 64)};
    const Matrix x = randn(6 * 64, gen, 1.0f);
    std::vector<float> ya(6 * 20), yb(6 * 7), ra(ya.size()), rb(yb.size());
    const MatmulOut outs[2] = {{&wa, ya.data(), 20}, {&wb, yb.data(), 7}};
    matmul(outs, 2, x.data(), 64, 6);
    matmul(wa, x.data(), 6, ra.data());
    matmul(wb, x.data(), 6, rb.data());
    EXPECT_EQ(ya, ra);
    EXPECT_EQ(yb, rb);

    const QMatrix narrow{GGMLType::Q8_0, a.bytes.data(), 10, 32,
                         ggml_row_bytes(GGMLType::Q8_0, 32)};
    const MatmulOut mixed[2] = {{&wa, ya.data(), 20}, {&narrow, yb.data(), 10}};
    expect_error<std::invalid_argument>([&] { matmul(mixed, 2, x.data(), 64, 6); }, "column");
    expect_error<std::invalid_argument>([&] { matmul(wa, x.data(), 0, ya.data()); }, "vector");
}
