// GGUF reader/writer and ggml dequantizers. The quantizers and decoders here are written from the
// format description (docs/gguf.md, ggml-common.h) byte by byte, independently of src/model.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/half.h"
#include "model/dequant.h"
#include "model/gguf.h"
#include "model/gguf_writer.h"

using namespace veloxquant;

namespace {

// A file under the test temp dir, removed when the object dies.
class TempFile {
public:
    TempFile() {
        static int counter = 0;
        const auto* info = testing::UnitTest::GetInstance()->current_test_info();
        path_ = testing::TempDir() + "vq_gguf_" + info->name() + "_" + std::to_string(counter++) +
                ".gguf";
    }
    ~TempFile() { std::remove(path_.c_str()); }
    const std::string& path() const { return path_; }
    void write(const std::string& bytes) const {
        std::ofstream(path_, std::ios::binary).write(bytes.data(), bytes.size());
    }

private:
    std::string path_;
};

// The message of the std::runtime_error that fn throws, or "" if it throws none.
std::string error_of(const std::function<void()>& fn) {
    try {
        fn();
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    return "";
}

void expect_error(const std::function<void()>& fn, const std::string& fragment) {
    const std::string msg = error_of(fn);
    EXPECT_NE(msg.find(fragment), std::string::npos)
        << "message: \"" << msg << "\"\nexpected fragment: " << fragment;
}

// Opens `bytes` through a temporary file (removed at once; the mapping keeps the data).
std::unique_ptr<GGUFFile> open_bytes(const std::string& bytes) {
    TempFile f;
    f.write(bytes);
    return GGUFFile::open(f.path());
}

// Expects opening `bytes` to throw std::runtime_error containing `fragment`.
void expect_open_error(const std::string& bytes, const std::string& fragment) {
    expect_error([&] { open_bytes(bytes); }, fragment);
}

// Hand-assembled GGUF bytes, for malformed files.
struct Raw {
    std::string b;
    Raw& put(const void* p, std::size_t n) {
        b.append(static_cast<const char*>(p), n);
        return *this;
    }
    Raw& u8(uint8_t v) { return put(&v, 1); }
    Raw& u32(uint32_t v) { return put(&v, 4); }
    Raw& u64(uint64_t v) { return put(&v, 8); }
    Raw& str(const std::string& s) { return u64(s.size()).put(s.data(), s.size()); }
    Raw& zeros(std::size_t n) { return put(std::string(n, '\0').data(), n); }
    Raw& pad() { return zeros((32 - b.size() % 32) % 32); }
    Raw& header(uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
        return put("GGUF", 4).u32(version).u64(n_tensors).u64(n_kv);
    }
    Raw& kv_u32(const std::string& key, uint32_t v) { return str(key).u32(4).u32(v); }
    Raw& tensor(const std::string& name, const std::vector<uint64_t>& dims, uint32_t type,
                uint64_t offset) {
        str(name).u32(static_cast<uint32_t>(dims.size()));
        for (uint64_t d : dims) u64(d);
        return u32(type).u64(offset);
    }
};

// ---- test-side quantizers and decoders (byte level) ----

void put_half(std::vector<uint8_t>& out, float v) {
    const uint16_t h = float_to_half(v);
    out.push_back(static_cast<uint8_t>(h & 0xFF));
    out.push_back(static_cast<uint8_t>(h >> 8));
}

float get_half(const uint8_t* p) {
    return half_to_float(static_cast<uint16_t>(p[0] | p[1] << 8));
}

struct LegacySpec {
    GGMLType type;
    int bits;         // 4, 5 or 8
    bool affine;      // x = q*d + m instead of (q - offset)*d
    int block_bytes;  // 18, 20, 22, 24, 34
};

const LegacySpec kLegacy[] = {{GGMLType::Q4_0, 4, false, 18},
                              {GGMLType::Q4_1, 4, true, 20},
                              {GGMLType::Q5_0, 5, false, 22},
                              {GGMLType::Q5_1, 5, true, 24},
                              {GGMLType::Q8_0, 8, false, 34}};

// Quantizes 32 floats into one block: header (d, [m], [qh]) then the low 4 bits of element j
// and j+16 in byte j (Q8_0: one int8 per element). Bit 4 of element j is bit j of qh.
void quantize_legacy(const LegacySpec& s, const float* x, std::vector<uint8_t>& out) {
    float lo = x[0], hi = x[0];
    for (int j = 0; j < 32; ++j) lo = std::min(lo, x[j]), hi = std::max(hi, x[j]);
    const int levels = (1 << s.bits) - 1;
    const float amax = std::max(std::fabs(lo), std::fabs(hi));
    const float d = s.affine ? (hi - lo) / levels : amax / (s.bits == 8 ? 127 : (levels + 1) / 2);
    const float dh = half_to_float(float_to_half(d));
    const float mh = half_to_float(float_to_half(lo));
    int q[32];
    for (int j = 0; j < 32; ++j) {
        const float v = dh == 0 ? 0 : s.affine ? (x[j] - mh) / dh : x[j] / dh;
        const int zero = s.affine ? 0 : s.bits == 8 ? 0 : (levels + 1) / 2;
        const int lim_lo = s.bits == 8 ? -127 : 0, lim_hi = s.bits == 8 ? 127 : levels;
        q[j] = std::min(lim_hi, std::max(lim_lo, static_cast<int>(std::lround(v)) + zero));
    }
    put_half(out, d);
    if (s.affine) put_half(out, lo);
    if (s.bits == 8) {
        for (int j = 0; j < 32; ++j) out.push_back(static_cast<uint8_t>(static_cast<int8_t>(q[j])));
        return;
    }
    if (s.bits == 5) {
        uint32_t qh = 0;
        for (int j = 0; j < 32; ++j) qh |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
        for (int k = 0; k < 4; ++k) out.push_back(static_cast<uint8_t>(qh >> (8 * k)));
    }
    for (int j = 0; j < 16; ++j)
        out.push_back(static_cast<uint8_t>((q[j] & 15) | (q[j + 16] & 15) << 4));
}

// Decodes element j of a legacy block from its bytes.
float decode_legacy(const LegacySpec& s, const uint8_t* blk, int j) {
    const float d = get_half(blk);
    const int hdr = s.affine ? 4 : 2;
    if (s.bits == 8) return static_cast<float>(static_cast<int8_t>(blk[hdr + j])) * d;
    const uint8_t* qs = blk + hdr + (s.bits == 5 ? 4 : 0);
    int q = j < 16 ? qs[j] & 15 : qs[j - 16] >> 4;
    if (s.bits == 5) q |= ((blk[hdr + j / 8] >> (j % 8)) & 1) << 4;
    if (s.affine) return static_cast<float>(q) * d + get_half(blk + 2);
    return static_cast<float>(q - (s.bits == 5 ? 16 : 8)) * d;
}

// Packs 6-bit scales sc[8] and mins m[8] into 12 bytes: bytes 0-3 = sc[0..3] plus the top 2 bits
// of sc[4..7] in bits 6-7; bytes 4-7 likewise for m; bytes 8-11 = low nibbles of sc[4..7] and
// (high nibble) m[4..7].
void pack_k4_scales(const int* sc, const int* m, uint8_t* out) {
    for (int j = 0; j < 4; ++j) {
        out[j] = static_cast<uint8_t>(sc[j] | (sc[j + 4] >> 4) << 6);
        out[j + 4] = static_cast<uint8_t>(m[j] | (m[j + 4] >> 4) << 6);
        out[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | (m[j + 4] & 15) << 4);
    }
}

// Q4_K / Q5_K super-block with given d, dmin, scales, mins and quants (0..15 or 0..31); element
// i is in sub-block i/32, stored in qs[32*(i/64) + i%32], low nibble if i%64 < 32; its fifth bit
// is bit i/32 of qh[i%32]. Appends the expected values to `expect`.
void build_q45_k(bool five, float d, float dmin, const int* sc, const int* m,
                 const std::function<int(int)>& q, std::vector<uint8_t>& out,
                 std::vector<float>& expect) {
    const std::size_t base = out.size();
    out.resize(base + (five ? 176 : 144), 0);
    uint8_t* blk = out.data() + base;
    const uint16_t dh = float_to_half(d), mh = float_to_half(dmin);
    std::memcpy(blk, &dh, 2);
    std::memcpy(blk + 2, &mh, 2);
    pack_k4_scales(sc, m, blk + 4);
    uint8_t* qh = blk + 16;
    uint8_t* qs = blk + 16 + (five ? 32 : 0);
    for (int i = 0; i < 256; ++i) {
        const int v = q(i), sub = i / 32;
        uint8_t& byte = qs[32 * (i / 64) + i % 32];
        byte |= static_cast<uint8_t>(i % 64 < 32 ? (v & 15) : (v & 15) << 4);
        if (five) qh[i % 32] |= static_cast<uint8_t>(((v >> 4) & 1) << sub);
        expect.push_back(d * static_cast<float>(sc[sub] * v) - dmin * static_cast<float>(m[sub]));
    }
}

// Q6_K super-block: element i = 128h + 32g + l (g = 0..3) keeps its low 4 bits in ql[64h + l +
// 32(g&1)] (low nibble for g < 2), its top 2 bits in bits 2g..2g+1 of qh[32h + l], and uses
// scale 8h + 2g + l/16; value = d * scale * (q - 32).
void build_q6_k(float d, const int* scales, const std::function<int(int)>& q,
                std::vector<uint8_t>& out, std::vector<float>& expect) {
    const std::size_t base = out.size();
    out.resize(base + 210, 0);
    uint8_t* blk = out.data() + base;
    for (int i = 0; i < 256; ++i) {
        const int h = i / 128, g = (i % 128) / 32, l = i % 32, v = q(i);
        blk[64 * h + l + 32 * (g & 1)] |= static_cast<uint8_t>(g < 2 ? (v & 15) : (v & 15) << 4);
        blk[128 + 32 * h + l] |= static_cast<uint8_t>((v >> 4) << (2 * g));
        expect.push_back(d * static_cast<float>(scales[8 * h + 2 * g + l / 16] * (v - 32)));
    }
    for (int k = 0; k < 16; ++k)
        blk[192 + k] = static_cast<uint8_t>(static_cast<int8_t>(scales[k]));
    const uint16_t dh = float_to_half(d);
    std::memcpy(blk + 208, &dh, 2);
}

// Two hand-built super-blocks of Q4_K, Q5_K or Q6_K; appends their values to `expect`.
std::vector<uint8_t> k_quant_blocks(GGMLType type, std::vector<float>& expect) {
    // Scales and mins cover the full 6-bit range so the packed high bits matter.
    const int sc[2][8] = {{1, 17, 33, 63, 5, 40, 21, 62}, {63, 0, 16, 48, 31, 32, 47, 15}};
    const int mn[2][8] = {{0, 3, 63, 32, 48, 7, 16, 59}, {9, 60, 1, 36, 63, 20, 44, 2}};
    std::vector<uint8_t> bytes;
    for (int b = 0; b < 2; ++b) {
        // Quants are not periodic in 32 or 64, so mixing up sub-blocks or nibbles changes values.
        if (type == GGMLType::Q6_K) {
            int scales[16];
            for (int k = 0; k < 16; ++k) scales[k] = (k * 37 + 11 * b) % 255 - 127;
            auto q = [&](int i) { return (i * 13 + i / 32 * 7 + b) % 64; };
            build_q6_k(b ? 0.0625f : 0.5f, scales, q, bytes, expect);
        } else {
            const bool five = type == GGMLType::Q5_K;
            auto q = [&](int i) { return (i * (7 + 4 * b) + i / 32 * 5 + 3) % (five ? 32 : 16); };
            build_q45_k(five, b ? 0.5f : 0.125f, b ? 0.25f : 1.5f, sc[b], mn[b], q, bytes, expect);
        }
    }
    return bytes;
}

std::vector<float> dequant(GGMLType t, const std::vector<uint8_t>& bytes, int64_t n) {
    std::vector<float> y(static_cast<std::size_t>(n));
    dequantize_row(t, bytes.data(), y.data(), n);
    return y;
}

// ---- type tables and dequantizers ----

TEST(Dequant, TypeTablesAndUnsupportedTypes) {
    struct Row {
        GGMLType t;
        int block;
        std::size_t bytes;
        const char* name;
    };
    const Row rows[] = {{GGMLType::F32, 1, 4, "F32"},       {GGMLType::F16, 1, 2, "F16"},
                        {GGMLType::BF16, 1, 2, "BF16"},     {GGMLType::Q4_0, 32, 18, "Q4_0"},
                        {GGMLType::Q4_1, 32, 20, "Q4_1"},   {GGMLType::Q5_0, 32, 22, "Q5_0"},
                        {GGMLType::Q5_1, 32, 24, "Q5_1"},   {GGMLType::Q8_0, 32, 34, "Q8_0"},
                        {GGMLType::Q8_1, 32, 36, "Q8_1"},   {GGMLType::Q2_K, 256, 84, "Q2_K"},
                        {GGMLType::Q3_K, 256, 110, "Q3_K"}, {GGMLType::Q4_K, 256, 144, "Q4_K"},
                        {GGMLType::Q5_K, 256, 176, "Q5_K"}, {GGMLType::Q6_K, 256, 210, "Q6_K"},
                        {GGMLType::Q8_K, 256, 292, "Q8_K"}};
    for (const Row& r : rows) {
        EXPECT_EQ(ggml_block_size(r.t), r.block) << r.name;
        EXPECT_EQ(ggml_type_size(r.t), r.bytes) << r.name;
        EXPECT_STREQ(ggml_type_name(r.t), r.name);
        EXPECT_TRUE(ggml_type_is_known(static_cast<uint32_t>(r.t)));
    }
    EXPECT_FALSE(ggml_type_is_known(4));  // the removed Q4_2
    EXPECT_FALSE(ggml_type_is_known(99));
    EXPECT_EQ(ggml_row_bytes(GGMLType::Q4_1, 576), 360u);
    EXPECT_EQ(ggml_row_bytes(GGMLType::Q6_K, 512), 420u);
    EXPECT_THROW(ggml_row_bytes(GGMLType::Q4_0, 100), std::invalid_argument);
    EXPECT_THROW(ggml_row_bytes(GGMLType::F32, std::numeric_limits<int64_t>::max()),
                 std::invalid_argument);
    EXPECT_THROW(ggml_block_size(static_cast<GGMLType>(99)), std::invalid_argument);
    std::vector<uint8_t> buf(4096);
    std::vector<float> y(256);
    for (GGMLType t : {GGMLType::Q8_1, GGMLType::Q2_K, GGMLType::Q3_K, GGMLType::Q8_K}) {
        EXPECT_THROW(dequantize_row(t, buf.data(), y.data(), 256), std::invalid_argument);
    }
    EXPECT_THROW(dequantize_row(GGMLType::Q4_K, buf.data(), y.data(), 255), std::invalid_argument);
    EXPECT_THROW(dequantize_row(GGMLType::Q8_0, buf.data(), y.data(), 48), std::invalid_argument);
}

TEST(Dequant, FloatTypesKnownBits) {
    const uint16_t bits[12] = {0x3C00, 0xC000, 0x0001, 0x7BFF, 0x3555, 0x8000,   // F16
                               0x3F80, 0xC0A0, 0x4049, 0x0000, 0xFF80, 0x3E80};  // BF16
    const std::vector<float> expect = {1.0f,     -2.0f,           std::ldexp(1.0f, -24),
                                       65504.0f, 0.333251953125f, -0.0f,
                                       1.0f,     -5.0f,           3.140625f,
                                       0.0f,     -INFINITY,       0.25f};
    std::vector<float> y(12);
    dequantize_row(GGMLType::F16, bits, y.data(), 6);
    dequantize_row(GGMLType::BF16, bits + 6, y.data() + 6, 6);
    EXPECT_EQ(y, expect);
    EXPECT_TRUE(std::signbit(y[5]));
}

TEST(Dequant, LegacyTypesMatchReferenceAndReconstruct) {
    const int n = 32 * 12;
    std::mt19937 gen(7);
    std::normal_distribution<float> dist(0.3f, 1.5f);
    std::vector<float> x(n);
    for (float& v : x) v = dist(gen);
    for (int j = 0; j < 32; ++j) x[64 + j] = 0.0f;  // an all-zero block (d = 0)
    for (const LegacySpec& s : kLegacy) {
        std::vector<uint8_t> bytes;
        for (int b = 0; b < n / 32; ++b) quantize_legacy(s, &x[32 * b], bytes);
        ASSERT_EQ(bytes.size(), ggml_row_bytes(s.type, n));
        const auto y = dequant(s.type, bytes, n);
        for (int i = 0; i < n; ++i) {
            const uint8_t* blk = bytes.data() + (i / 32) * s.block_bytes;
            ASSERT_EQ(y[i], decode_legacy(s, blk, i % 32)) << ggml_type_name(s.type) << " " << i;
            // A wrong bit layout would not reconstruct the input to within one quantization step.
            const float step = get_half(blk) * 1.01f + 1e-3f * std::fabs(x[i]);
            ASSERT_LE(std::fabs(y[i] - x[i]), std::fabs(step))
                << ggml_type_name(s.type) << " " << i;
        }
        // Unaligned source pointers are allowed.
        std::vector<uint8_t> shifted(bytes.size() + 1);
        std::memcpy(shifted.data() + 1, bytes.data(), bytes.size());
        std::vector<float> z(n);
        dequantize_row(s.type, shifted.data() + 1, z.data(), n);
        EXPECT_EQ(z, y);
    }
}

TEST(Dequant, KQuantsHandBuiltBlocks) {
    for (GGMLType t : {GGMLType::Q4_K, GGMLType::Q5_K, GGMLType::Q6_K}) {
        std::vector<float> expect;
        const std::vector<uint8_t> bytes = k_quant_blocks(t, expect);
        EXPECT_EQ(dequant(t, bytes, 512), expect) << ggml_type_name(t);
    }
}

// ---- writer/reader round trip ----

TEST(GGUF, MetadataRoundTripEveryType) {
    GGUFWriter w;
    w.add_u8("t.u8", 250);
    w.add_i8("t.i8", -100);
    w.add_u16("t.u16", 65000);
    w.add_i16("t.i16", -32000);
    w.add_u32("t.u32", 4000000000u);
    w.add_i32("t.i32", -2000000000);
    w.add_u64("t.u64", 1ull << 62);
    w.add_u64("t.u64_big", std::numeric_limits<uint64_t>::max());
    w.add_i64("t.i64", std::numeric_limits<int64_t>::min());
    w.add_f32("t.f32", 1e-5f);
    w.add_f64("t.f64", -2.718281828459045);
    w.add_bool("t.bool", true);
    w.add_string("t.str", std::string("h\xc3\xa9llo\0x", 8));
    w.add_string("t.empty", "");
    w.add_string_array("t.sarr", {"a", "", "\xc4\xa0the"});
    w.add_i32_array("t.iarr", {-1, 0, 7});
    w.add_f32_array("t.farr", {0.5f, -1.25f});
    const double f64s[] = {1e300, -0.0};
    w.add_array("t.f64arr", GGUFValueType::F64, 2, f64s);
    const uint16_t u16s[] = {1, 65535};
    w.add_array("t.u16arr", GGUFValueType::U16, 2, u16s);
    w.add_array("t.u8arr", GGUFValueType::U8, 0, nullptr);
    const uint8_t bools[] = {1, 0};
    w.add_array("t.barr", GGUFValueType::BOOL, 2, bools);
    EXPECT_THROW(w.add_u8("t.u8", 1), std::invalid_argument);
    EXPECT_THROW(w.add_array("t.bad", GGUFValueType::STRING, 0, nullptr), std::invalid_argument);
    TempFile f;
    w.write(f.path());
    const auto g = GGUFFile::open(f.path());
    EXPECT_EQ(g->version(), 3u);
    EXPECT_EQ(g->keys().size(), 21u);
    EXPECT_EQ(g->keys().front(), "t.u8");
    const std::pair<const char*, int64_t> ints[] = {
        {"t.u8", 250},         {"t.i8", -100},
        {"t.u16", 65000},      {"t.i16", -32000},
        {"t.u32", 4000000000}, {"t.i32", -2000000000},
        {"t.u64", 1ll << 62},  {"t.i64", std::numeric_limits<int64_t>::min()}};
    for (const auto& kv : ints) EXPECT_EQ(g->get_int(kv.first), kv.second) << kv.first;
    EXPECT_EQ(g->get_float("t.f32"), static_cast<double>(1e-5f));
    EXPECT_EQ(g->get_float("t.f64"), -2.718281828459045);
    EXPECT_TRUE(g->get_bool("t.bool", false));
    EXPECT_EQ(g->get_string("t.str"), std::string("h\xc3\xa9llo\0x", 8));
    EXPECT_EQ(g->get_string("t.empty"), "");
    EXPECT_EQ(g->get_string_array("t.sarr"), (std::vector<std::string>{"a", "", "\xc4\xa0the"}));
    EXPECT_EQ(g->get_int_array("t.iarr"), (std::vector<int64_t>{-1, 0, 7}));
    EXPECT_EQ(g->get_int_array("t.u16arr"), (std::vector<int64_t>{1, 65535}));
    EXPECT_TRUE(g->get_int_array("t.u8arr").empty());
    EXPECT_EQ(g->get_float_array("t.farr"), (std::vector<double>{0.5, -1.25}));
    EXPECT_EQ(g->get_float_array("t.f64arr"), (std::vector<double>{1e300, -0.0}));
    EXPECT_EQ(g->value_type("t.sarr"), GGUFValueType::ARRAY);
    EXPECT_EQ(g->array_type("t.barr"), GGUFValueType::BOOL);
    // Fallbacks apply only to absent keys.
    EXPECT_EQ(g->get_int("nope", 5), 5);
    EXPECT_EQ(g->get_float("nope", 0.5), 0.5);
    EXPECT_FALSE(g->get_bool("nope", false));
    EXPECT_EQ(g->get_int("t.u8", 5), 250);
    expect_error([&] { g->get_int("nope"); }, "key 'nope' not found");
    expect_error([&] { g->get_int("t.str"); }, "key 't.str' has type string, expected an integer");
    expect_error([&] { g->get_int("t.f32"); }, "key 't.f32' has type f32");
    expect_error([&] { g->get_int("t.u64_big"); }, "exceeds the int64 range");
    expect_error([&] { g->get_float("t.i32"); }, "key 't.i32' has type i32, expected f32 or f64");
    expect_error([&] { g->get_string("t.u8"); }, "key 't.u8' has type u8");
    expect_error([&] { g->get_bool("t.u8", true); }, "key 't.u8' has type u8, expected bool");
    expect_error([&] { g->get_int("t.sarr", 1); }, "has type array of string");
    expect_error([&] { g->get_int_array("t.farr"); }, "key 't.farr' has type array of f32");
    expect_error([&] { g->get_float_array("t.iarr"); }, "has type array of i32");
    expect_error([&] { g->get_string_array("t.str"); }, "key 't.str' has type string");
    expect_error([&] { g->get_int_array("t.barr"); }, "array of bool");
}

TEST(GGUF, TensorRoundTripEveryType) {
    std::mt19937 gen(3);
    std::normal_distribution<float> dist(0.0f, 2.0f);
    GGUFWriter w;
    w.add_string("general.architecture", "llama");
    struct Item {
        std::string name;
        std::vector<uint8_t> raw;
        std::vector<float> expect;
    };
    std::vector<Item> items;
    auto add = [&](GGMLType type, const std::vector<int64_t>& dims, std::vector<uint8_t> raw,
                   std::vector<float> expect) {
        const std::string name = std::string("w.") + ggml_type_name(type);
        w.add_tensor(name, dims, type, raw);
        items.push_back({name, std::move(raw), std::move(expect)});
    };
    for (const LegacySpec& s : kLegacy) {
        std::vector<float> x(192), e(192);
        for (float& v : x) v = dist(gen);
        std::vector<uint8_t> bytes;
        for (int b = 0; b < 6; ++b) quantize_legacy(s, &x[32 * b], bytes);
        for (int i = 0; i < 192; ++i)
            e[i] = decode_legacy(s, &bytes[i / 32 * s.block_bytes], i % 32);
        add(s.type, {64, 3}, bytes, e);
    }
    for (GGMLType t : {GGMLType::Q4_K, GGMLType::Q5_K, GGMLType::Q6_K}) {
        std::vector<float> expect;
        std::vector<uint8_t> bytes = k_quant_blocks(t, expect);
        add(t, {256, 2}, bytes, expect);
    }
    const std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 1e-20f, -7.0f};
    std::vector<uint8_t> f32_raw(24), f16, bf16;
    std::memcpy(f32_raw.data(), f32.data(), 24);
    std::vector<float> f16_e, bf16_e;
    for (float v : f32) {
        put_half(f16, v);
        f16_e.push_back(half_to_float(float_to_half(v)));
        const uint16_t b = float_to_bf16(v);
        bf16.insert(bf16.end(), {static_cast<uint8_t>(b & 0xFF), static_cast<uint8_t>(b >> 8)});
        bf16_e.push_back(bf16_to_float(b));
    }
    add(GGMLType::F32, {2, 3, 1, 1}, f32_raw, f32);
    add(GGMLType::F16, {3, 2}, f16, f16_e);
    add(GGMLType::BF16, {6}, bf16, bf16_e);
    EXPECT_THROW(w.add_tensor("w.F32", {6}, f32), std::invalid_argument);  // duplicate
    EXPECT_THROW(w.add_tensor("w.bad", {64, 2}, GGMLType::Q4_0, f32_raw), std::invalid_argument);
    EXPECT_THROW(w.add_tensor("w.bad", {48}, GGMLType::Q4_0, f32_raw), std::invalid_argument);
    EXPECT_THROW(w.add_tensor("w.bad", {}, f32), std::invalid_argument);

    TempFile f;
    w.write(f.path());
    const auto g = GGUFFile::open(f.path());
    ASSERT_EQ(g->tensors().size(), items.size());
    EXPECT_EQ(g->alignment(), 32u);
    EXPECT_EQ(g->data_offset() % 32, 0u);
    for (std::size_t k = 0; k < items.size(); ++k) {
        const GGUFTensor* t = g->find_tensor(items[k].name);
        ASSERT_NE(t, nullptr) << items[k].name;
        EXPECT_EQ(&g->tensors()[k], t);  // file order is insertion order
        EXPECT_EQ(t->offset % 32, 0u);
        ASSERT_EQ(t->nbytes, items[k].raw.size());
        EXPECT_EQ(std::memcmp(t->data, items[k].raw.data(), t->nbytes), 0);
        std::vector<float> y(static_cast<std::size_t>(t->n_elements()));
        const std::size_t row_bytes = ggml_row_bytes(t->type, t->cols());
        for (int64_t r = 0; r < t->rows(); ++r) {
            dequantize_row(t->type, t->data + r * row_bytes, &y[r * t->cols()], t->cols());
        }
        EXPECT_EQ(y, items[k].expect) << items[k].name;
    }
    const GGUFTensor* t = g->find_tensor("w.F32");
    EXPECT_EQ(t->dims, (std::vector<int64_t>{2, 3, 1, 1}));
    EXPECT_EQ(t->rows(), 3);
    EXPECT_EQ(t->cols(), 2);
    EXPECT_EQ(g->find_tensor("w.Q4_0")->rows(), 3);
    EXPECT_EQ(g->find_tensor("missing"), nullptr);
    const auto hist = g->type_histogram();
    EXPECT_EQ(hist.size(), 11u);
    EXPECT_EQ(hist.at("Q8_0"), 1);
}

TEST(GGUF, CustomAlignmentAndVersion2) {
    GGUFWriter w;
    w.add_u32("general.alignment", 64);
    w.add_tensor("a", {3}, std::vector<float>{1, 2, 3});
    w.add_tensor("b", {5}, std::vector<float>{4, 5, 6, 7, 8});
    EXPECT_THROW(w.add_u32("general.alignment", 64), std::invalid_argument);
    GGUFWriter bad;
    EXPECT_THROW(bad.add_u32("general.alignment", 48), std::invalid_argument);
    EXPECT_THROW(bad.add_u64("general.alignment", 64), std::invalid_argument);
    std::string bytes = w.to_bytes();
    EXPECT_EQ(bytes.size() % 64, 0u);
    for (uint32_t version : {3u, 2u}) {
        bytes[4] = static_cast<char>(version);
        const auto g = open_bytes(bytes);
        EXPECT_EQ(g->version(), version);
        EXPECT_EQ(g->alignment(), 64u);
        EXPECT_EQ(g->data_offset() % 64, 0u);
        EXPECT_EQ(g->find_tensor("b")->offset, 64u);
        float v;
        std::memcpy(&v, g->find_tensor("b")->data + 4, 4);
        EXPECT_EQ(v, 5.0f);
    }
}

// ---- malformed files ----

std::string small_valid_file() {
    GGUFWriter w;
    w.add_string("general.architecture", "llama");
    w.add_u32("llama.block_count", 2);
    w.add_string_array("tokenizer.ggml.tokens", {"a", "bc", "def"});
    w.add_tensor("x", {4}, std::vector<float>{1, 2, 3, 4});
    std::vector<uint8_t> q(2 * 20, 1);
    w.add_tensor("y", {32, 2}, GGMLType::Q4_1, q);
    return w.to_bytes();
}

TEST(GGUFErrors, TruncatedAtEveryByte) {
    const std::string full = small_valid_file();
    const auto g = open_bytes(full);
    const GGUFTensor* y = g->find_tensor("y");
    const std::size_t data_end = g->data_offset() + y->offset + y->nbytes;
    ASSERT_LT(data_end, full.size());  // the file ends with padding
    for (std::size_t cut = 0; cut < full.size(); ++cut) {
        const std::string msg = error_of([&] { open_bytes(full.substr(0, cut)); });
        if (cut >= data_end) {  // only trailing padding is missing
            EXPECT_EQ(msg, "") << "cut " << cut;
            continue;
        }
        const bool ok = msg.find("unexpected end of file") != std::string::npos ||
                        msg.find("runs past end of file") != std::string::npos ||
                        msg.find("cannot fit in a file") != std::string::npos;
        EXPECT_TRUE(ok) << "cut " << cut << ": \"" << msg << '"';
        if (cut >= g->data_offset()) {
            EXPECT_NE(msg.find("data ["), std::string::npos) << msg;
        }
    }
}

TEST(GGUFErrors, HeaderErrors) {
    expect_open_error("", "unexpected end of file reading magic");
    expect_open_error(Raw().header(3, 0, 0).b.replace(0, 4, "GGML"), "bad magic 47 47 4d 4c");
    expect_open_error(Raw().header(1, 0, 0).b, "version 1 is not supported");
    expect_open_error(Raw().header(4, 0, 0).b, "version 4 is not supported");
    expect_open_error(Raw().header(0x03000000, 0, 0).b, "big-endian");
    expect_open_error(Raw().header(3, 1ull << 62, 0).b,
                      "tensor_count 4611686018427387904 cannot fit");
    expect_open_error(Raw().header(3, 0, 1ull << 60).zeros(64).b, "metadata_kv_count");
    expect_error([] { GGUFFile::open("/nonexistent/dir/x.gguf"); },
                 "cannot open /nonexistent/dir/x.gguf");
    // An empty but well-formed file opens.
    EXPECT_TRUE(open_bytes(Raw().header(3, 0, 0).b)->tensors().empty());
}

TEST(GGUFErrors, MetadataErrors) {
    expect_open_error(Raw().header(3, 0, 1).u64(1000).b.append(20, 'k'),
                      "key 0 length 1000 at offset 24 runs past end of file");
    expect_open_error(Raw().header(3, 0, 1).str("k").u32(8).u64(500).zeros(16).b,
                      "key 'k' string length 500");
    expect_open_error(Raw().header(3, 0, 1).str("k").u32(13).zeros(8).b,
                      "key 'k' has unknown value type 13");
    expect_open_error(Raw().header(3, 0, 1).str("k").u32(7).u8(2).b, "bool value 2 is not 0 or 1");
    expect_open_error(Raw().header(3, 0, 2).kv_u32("k", 1).kv_u32("k", 2).b, "duplicate key 'k'");
    // Huge array lengths are rejected before any element is read.
    expect_open_error(Raw().header(3, 0, 1).str("k").u32(9).u32(4).u64(1ull << 61).zeros(64).b,
                      "key 'k' array length 2305843009213693952 of u32 runs past end");
    expect_open_error(Raw().header(3, 0, 1).str("k").u32(9).u32(8).u64(~0ull).zeros(64).b,
                      "array length 18446744073709551615 of string");
    expect_open_error(Raw().header(3, 0, 1).str("k").u32(9).u32(42).u64(0).b,
                      "unknown array element type 42");
    // Arrays may nest four deep, not five.
    auto nested = [](int depth) {
        Raw r;
        r.header(3, 0, 1).str("n").u32(9);
        for (int i = 1; i < depth; ++i) r.u32(9).u64(1);
        return r.u32(0).u64(1).u8(7).b;
    };
    const auto g = open_bytes(nested(4));
    EXPECT_EQ(g->array_type("n"), GGUFValueType::ARRAY);
    EXPECT_THROW(g->get_int_array("n"), std::runtime_error);
    expect_open_error(nested(5), "key 'n' has arrays nested deeper than 4");
    // Alignment: a power of two >= 8, stored as u32.
    for (uint32_t a : {0u, 4u, 12u, 48u}) {
        expect_open_error(Raw().header(3, 0, 1).kv_u32("general.alignment", a).b,
                          "general.alignment " + std::to_string(a) + " is not a power of two");
    }
    expect_open_error(Raw().header(3, 0, 1).str("general.alignment").u32(10).u64(32).b,
                      "general.alignment has type u64, expected u32");
}

TEST(GGUFErrors, TensorInfoErrors) {
    auto one = [](const std::string& name, const std::vector<uint64_t>& dims, uint32_t type,
                  uint64_t offset, std::size_t data = 64) {
        return Raw().header(3, 1, 0).tensor(name, dims, type, offset).pad().zeros(data).b;
    };
    expect_open_error(one(std::string(65, 'n'), {4}, 0, 0), "tensor 0 name length 65 exceeds");
    expect_open_error(one("t", {1, 1, 1, 1, 1}, 0, 0),
                      "tensor 't' n_dims 5 is out of range [1, 4]");
    expect_open_error(one("t", {}, 0, 0), "tensor 't' n_dims 0 is out of range");
    expect_open_error(one("t", {4, 0}, 0, 0), "tensor 't' dims[1] = 0 is not in [1, INT64_MAX]");
    expect_open_error(one("t", {1ull << 63}, 0, 0), "dims[0] = 9223372036854775808");
    expect_open_error(one("t", {1ull << 32, 1ull << 32}, 0, 0), "element count overflows");
    expect_open_error(one("t", {1ull << 62}, 0, 0), "tensor 't' byte size overflows");
    expect_open_error(one("t", {32}, 99, 0), "tensor 't' has unknown ggml type id 99");
    expect_open_error(one("t", {32}, 4, 0), "unknown ggml type id 4");
    expect_open_error(one("t", {48}, 2, 0),
                      "tensor 't' dims[0] = 48 is not a multiple of the Q4_0 "
                      "block size 32");
    expect_open_error(one("t", {4}, 0, 16),
                      "tensor 't' offset 16 is not a multiple of the "
                      "alignment 32");
    expect_open_error(one("t", {4}, 0, 1ull << 40), "tensor 't' offset 1099511627776 runs past");
    expect_open_error(one("t", {4}, 0, ~0ull - 31), "offset 18446744073709551584 runs past");
    // The data section starts at 64 here: 16 floats fit, 17 do not.
    expect_open_error(one("w", {17}, 0, 0),
                      "tensor 'w' data [64, 132) runs past end of file (size 128)");
    EXPECT_EQ(open_bytes(one("w", {16}, 0, 0))->find_tensor("w")->nbytes, 64u);
    expect_open_error(
        Raw().header(3, 2, 0).tensor("a", {4}, 0, 0).tensor("a", {4}, 0, 32).pad().zeros(64).b,
        "duplicate tensor name 'a'");
    // Overlapping tensors are allowed.
    const auto g = open_bytes(
        Raw().header(3, 2, 0).tensor("a", {8}, 0, 0).tensor("b", {2, 2}, 0, 0).pad().zeros(32).b);
    EXPECT_EQ(g->find_tensor("a")->data, g->find_tensor("b")->data);
}

// ---- the real model ----

std::string model_path() {
    if (const char* env = std::getenv("VQ_GGUF_MODEL")) return env;
    std::string here = __FILE__;  // <repo>/tests/test_gguf.cpp
    return here.substr(0, here.size() - std::string("tests/test_gguf.cpp").size()) +
           "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

TEST(GGUFModel, SmolLM2Metadata) {
    const std::string path = model_path();
    if (!std::ifstream(path).good()) GTEST_SKIP() << path << " not present";
    const auto g = GGUFFile::open(path);
    EXPECT_EQ(g->version(), 3u);
    EXPECT_EQ(g->tensors().size(), 272u);
    EXPECT_EQ(g->get_string("general.architecture"), "llama");
    EXPECT_EQ(g->get_int("llama.block_count"), 30);
    EXPECT_EQ(g->get_int("llama.embedding_length"), 576);
    EXPECT_EQ(g->get_int("llama.feed_forward_length"), 1536);
    EXPECT_EQ(g->get_int("llama.attention.head_count"), 9);
    EXPECT_EQ(g->get_int("llama.attention.head_count_kv"), 3);
    EXPECT_EQ(g->get_int("llama.rope.dimension_count"), 64);
    EXPECT_EQ(g->get_float("llama.rope.freq_base"), 100000.0);
    EXPECT_NEAR(g->get_float("llama.attention.layer_norm_rms_epsilon"), 1e-5, 1e-12);
    EXPECT_EQ(g->get_string("tokenizer.ggml.model"), "gpt2");
    EXPECT_EQ(g->get_string_array("tokenizer.ggml.tokens").size(), 49152u);
    EXPECT_EQ(g->get_int_array("tokenizer.ggml.token_type").size(), 49152u);
    EXPECT_EQ(g->get_string_array("tokenizer.ggml.merges").size(), 48900u);
    EXPECT_FALSE(g->get_bool("tokenizer.ggml.add_bos_token", true));
    EXPECT_EQ(g->type_histogram(),
              (std::map<std::string, int>{{"F32", 61}, {"Q4_1", 210}, {"Q8_0", 1}}));
    const GGUFTensor* emb = g->find_tensor("token_embd.weight");
    ASSERT_NE(emb, nullptr);
    EXPECT_EQ(emb->type, GGMLType::Q8_0);
    EXPECT_EQ(emb->dims, (std::vector<int64_t>{576, 49152}));
    EXPECT_EQ(g->find_tensor("output.weight"), nullptr);  // tied embeddings
    for (const char* name :
         {"token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_norm.weight"}) {
        const GGUFTensor* t = g->find_tensor(name);
        ASSERT_NE(t, nullptr) << name;
        std::vector<float> row(static_cast<std::size_t>(t->cols()));
        dequantize_row(t->type, t->data, row.data(), t->cols());
        double sum_sq = 0;
        for (float v : row) {
            ASSERT_TRUE(std::isfinite(v)) << name;
            sum_sq += static_cast<double>(v) * v;
        }
        EXPECT_GT(sum_sq, 0.0) << name;
        EXPECT_LT(std::sqrt(sum_sq / row.size()), 10.0) << name;
    }
}

}  // namespace
