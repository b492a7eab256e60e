// Calibration files: "VQCALIB\0" magic, format version, payload length and CRC-32, then the
// payload: the model fingerprint, the RoPE frequencies, and a tagged list of sections. Written
// atomically; every field is range-checked on load, so a file whose CRC was forged to match
// inconsistent content is still rejected.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "core/binary_io.h"
#include "veloxquant/calibration.h"

namespace veloxquant {
namespace {

constexpr char kMagic[8] = {'V', 'Q', 'C', 'A', 'L', 'I', 'B', '\0'};
// Version 2: spectral rotations gained a row (the query second moments), [heads][d + 3][d].
constexpr uint32_t kFormatVersion = 2;
enum class Section : uint32_t {
    kVecInfer = 1,
    kSpectral = 2,
    kRateQuant = 3,
    kCommVQ = 4,
    kRaBitQ = 5
};

// Raised for content that parses but cannot be right; load() prefixes the path.
[[noreturn]] void bad(const std::string& what) {
    throw std::runtime_error(what);
}

void write_array(BinaryWriter& out, const FloatArray& a) {
    out.vec(a.shape);
    out.vec(a.data);
}

FloatArray read_array(BinaryReader& in, const char* what) {
    FloatArray a;
    a.shape = in.vec<int64_t>(8);
    a.data = in.vec<float>(std::size_t{1} << 32);
    const int64_t n = a.shape.empty() ? 0 : a.shape_size();
    if (n < 0) bad(std::string(what) + ": a negative dimension or too many values");
    if (n != static_cast<int64_t>(a.data.size()))
        bad(std::string(what) + ": " + std::to_string(a.data.size()) + " values for a shape of " +
            std::to_string(n));
    for (float v : a.data)
        if (!std::isfinite(v)) bad(std::string(what) + ": non-finite value");
    return a;
}

void check_shape(const FloatArray& a, const std::vector<int64_t>& expected, const char* what) {
    if (a.shape != expected) {
        std::ostringstream s;
        s << what << " has shape [";
        for (std::size_t i = 0; i < a.shape.size(); ++i) s << (i ? "," : "") << a.shape[i];
        s << "], expected [";
        for (std::size_t i = 0; i < expected.size(); ++i) s << (i ? "," : "") << expected[i];
        s << "]";
        bad(s.str());
    }
}

void check_bits(int bits, const char* what) {
    if (bits < 1 || bits > 8)
        bad(std::string(what) + " bits " + std::to_string(bits) + " outside 1..8");
}

void write_payload(BinaryWriter& out, const Calibration& c) {
    out.str(c.model.architecture);
    out.str(c.model.name);
    out.put<uint32_t>(static_cast<uint32_t>(c.model.shape.layers.size()));
    for (const auto& l : c.model.shape.layers) {
        out.put<int32_t>(l.num_kv_heads);
        out.put<int32_t>(l.head_dim);
    }
    out.put<uint64_t>(c.model.tensor_hash);
    out.vec(c.rope_inv_freq);
    out.put<uint32_t>(static_cast<uint32_t>(c.sections().size()));
    if (c.vecinfer) {
        out.put<uint32_t>(static_cast<uint32_t>(Section::kVecInfer));
        write_array(out, c.vecinfer->codebook);
        write_array(out, c.vecinfer->smooth_factors);
        out.put<int32_t>(c.vecinfer->num_subspaces);
        out.put<int32_t>(c.vecinfer->bits);
    }
    if (c.spectral) {
        out.put<uint32_t>(static_cast<uint32_t>(Section::kSpectral));
        out.put<uint64_t>(c.spectral->rotations.size());
        for (const auto& r : c.spectral->rotations) write_array(out, r);
    }
    if (c.ratequant) {
        const auto& r = *c.ratequant;
        out.put<uint32_t>(static_cast<uint32_t>(Section::kRateQuant));
        out.put<uint64_t>(r.bit_allocation.size());
        for (const auto& [k, b] : r.bit_allocation) {
            out.str(k);
            out.put<int32_t>(b);
        }
        out.put<double>(r.target_bits);
        out.put<uint64_t>(r.units.size());
        for (const auto& u : r.units) out.str(u);
        out.vec(r.sensitivity);
        out.vec(r.curve_a);
        out.vec(r.curve_beta);
    }
    if (c.commvq) {
        out.put<uint32_t>(static_cast<uint32_t>(Section::kCommVQ));
        write_array(out, c.commvq->codebook);
        out.put<int32_t>(c.commvq->num_codebooks);
        out.put<int32_t>(c.commvq->bits);
    }
    if (c.rabitq) {
        out.put<uint32_t>(static_cast<uint32_t>(Section::kRaBitQ));
        write_array(out, c.rabitq->ivf_centroids);
        out.put<int32_t>(c.rabitq->num_clusters);
    }
}

Calibration read_payload(BinaryReader& in) {
    Calibration c;
    c.model.architecture = in.str(256);
    c.model.name = in.str(4096);
    const auto n_layers = in.get<uint32_t>();
    if (n_layers < 1 || n_layers > 100000) bad("bad layer count " + std::to_string(n_layers));
    for (uint32_t l = 0; l < n_layers; ++l) {
        ModelShape::Layer layer;
        layer.num_kv_heads = in.get<int32_t>();
        layer.head_dim = in.get<int32_t>();
        if (layer.num_kv_heads < 1 || layer.num_kv_heads > 4096 || layer.head_dim < 2 ||
            layer.head_dim > 1024)
            bad("layer " + std::to_string(l) + " has an impossible shape");
        c.model.shape.layers.push_back(layer);
    }
    c.model.tensor_hash = in.get<uint64_t>();
    c.rope_inv_freq = in.vec<double>(4096);
    for (double f : c.rope_inv_freq)
        if (!(f > 0.0) || !std::isfinite(f)) bad("RoPE frequencies must be finite and positive");
    const auto& layers = c.model.shape.layers;
    const int64_t L = static_cast<int64_t>(layers.size());
    const auto n_sections = in.get<uint32_t>();
    if (n_sections > 5) bad("bad section count " + std::to_string(n_sections));
    for (uint32_t s = 0; s < n_sections; ++s) {
        const auto tag = static_cast<Section>(in.get<uint32_t>());
        switch (tag) {
            case Section::kVecInfer: {
                if (c.vecinfer) bad("duplicate vecinfer section");
                Calibration::VecInfer v;
                v.codebook = read_array(in, "vecinfer codebook");
                v.smooth_factors = read_array(in, "vecinfer smooth_factors");
                v.num_subspaces = in.get<int32_t>();
                v.bits = in.get<int32_t>();
                check_bits(v.bits, "vecinfer");
                if (v.num_subspaces < 1 || v.num_subspaces > 1024)
                    bad("vecinfer num_subspaces out of range");
                if (v.codebook.shape.size() != 5 || v.codebook.shape[0] != L ||
                    v.codebook.shape[2] != v.num_subspaces)
                    bad("vecinfer codebook must be "
                        "[layers][heads][num_subspaces][codewords][sub_dim]");
                if (v.smooth_factors.shape.size() != 3 || v.smooth_factors.shape[0] != L)
                    bad("vecinfer smooth_factors must be [layers][heads][head_dim]");
                c.vecinfer = std::move(v);
                break;
            }
            case Section::kSpectral: {
                if (c.spectral) bad("duplicate spectral section");
                Calibration::Spectral sp;
                const auto n = in.get<uint64_t>();
                if (n != static_cast<uint64_t>(L))
                    bad("spectral section has " + std::to_string(n) + " rotations for " +
                        std::to_string(L) + " layers");
                for (int64_t l = 0; l < L; ++l) {
                    FloatArray r = read_array(in, "spectral rotation");
                    const int64_t d = layers[l].head_dim;
                    check_shape(r, {layers[l].num_kv_heads, d + 3, d}, "spectral rotation");
                    sp.rotations.push_back(std::move(r));
                }
                c.spectral = std::move(sp);
                break;
            }
            case Section::kRateQuant: {
                if (c.ratequant) bad("duplicate ratequant section");
                Calibration::RateQuant r;
                const auto n = in.get<uint64_t>();
                if (n < 1 || n > 1000000) bad("bad ratequant allocation size");
                for (uint64_t i = 0; i < n; ++i) {
                    std::string k = in.str(64);
                    const int b = in.get<int32_t>();
                    check_bits(b, "ratequant allocation");
                    r.bit_allocation[k] = b;
                }
                r.target_bits = in.get<double>();
                if (!(r.target_bits >= 1.0 && r.target_bits <= 8.0))
                    bad("ratequant target bits outside 1..8");
                const auto n_units = in.get<uint64_t>();
                if (n_units > 1000000) bad("bad ratequant unit count");
                for (uint64_t i = 0; i < n_units; ++i) r.units.push_back(in.str(64));
                r.sensitivity = in.vec<double>(1000000);
                r.curve_a = in.vec<double>(1000000);
                r.curve_beta = in.vec<double>(1000000);
                if (r.sensitivity.size() != n_units || r.curve_a.size() != n_units ||
                    r.curve_beta.size() != n_units)
                    bad("ratequant report vectors differ in length from the unit list");
                KVCacheConfig probe;  // reuses the config's check of "L" / "L.H" keys
                probe.method = "ratequant";
                probe.bit_allocation = r.bit_allocation;
                try {
                    probe.validate();
                } catch (const std::invalid_argument& e) {
                    bad(e.what());
                }
                c.ratequant = std::move(r);
                break;
            }
            case Section::kCommVQ: {
                if (c.commvq) bad("duplicate commvq section");
                Calibration::CommVQ v;
                v.codebook = read_array(in, "commvq codebook");
                v.num_codebooks = in.get<int32_t>();
                v.bits = in.get<int32_t>();
                check_bits(v.bits, "commvq");
                if (v.num_codebooks < 1 || v.num_codebooks > 1024)
                    bad("commvq num_codebooks out of range");
                if (v.codebook.empty()) bad("commvq codebook is empty");
                c.commvq = std::move(v);
                break;
            }
            case Section::kRaBitQ: {
                if (c.rabitq) bad("duplicate rabitq section");
                Calibration::RaBitQ r;
                r.ivf_centroids = read_array(in, "rabitq ivf_centroids");
                r.num_clusters = in.get<int32_t>();
                if (r.num_clusters < 1 || r.num_clusters > 65536)
                    bad("rabitq num_clusters out of range");
                check_shape(r.ivf_centroids,
                            {L, layers[0].num_kv_heads, r.num_clusters, layers[0].head_dim},
                            "rabitq ivf_centroids");
                c.rabitq = std::move(r);
                break;
            }
            default:
                bad("unknown section tag " + std::to_string(static_cast<uint32_t>(tag)));
        }
    }
    return c;
}

std::string frame(const std::string& payload) {
    BinaryWriter out;
    out.bytes(kMagic, sizeof kMagic);
    out.put<uint32_t>(kFormatVersion);
    out.put<uint64_t>(payload.size());
    out.put<uint32_t>(crc32(payload.data(), payload.size()));
    out.bytes(payload.data(), payload.size());
    return out.buffer();
}

std::string producer(const std::string& method, const std::string& function) {
    return "run `veloxquant calibrate --method " + method + " --out FILE` (C++: " + function + ")";
}

}  // namespace

std::string ModelFingerprint::describe() const {
    std::ostringstream s;
    s << (name.empty() ? "unnamed model" : name) << " (" << architecture << ", "
      << shape.layers.size() << " layers";
    if (!shape.layers.empty())
        s << ", " << shape.layers[0].num_kv_heads << " KV heads x " << shape.layers[0].head_dim;
    s << ", tensors 0x" << std::hex << tensor_hash << ")";
    return s.str();
}

bool ModelFingerprint::operator==(const ModelFingerprint& o) const {
    if (architecture != o.architecture || tensor_hash != o.tensor_hash ||
        shape.layers.size() != o.shape.layers.size())
        return false;
    for (std::size_t l = 0; l < shape.layers.size(); ++l)
        if (shape.layers[l].num_kv_heads != o.shape.layers[l].num_kv_heads ||
            shape.layers[l].head_dim != o.shape.layers[l].head_dim)
            return false;
    return true;
}

std::vector<std::string> Calibration::sections() const {
    std::vector<std::string> s;
    if (vecinfer) s.push_back("vecinfer");
    if (spectral) s.push_back("spectral");
    if (ratequant) s.push_back("ratequant");
    if (commvq) s.push_back("commvq");
    if (rabitq) s.push_back("rabitq");
    return s;
}

void Calibration::save(const std::string& path) const {
    Calibration merged = *this;
    if (std::filesystem::exists(path)) {
        const Calibration old = load(path);
        if (old.model != model)
            throw std::invalid_argument("calibration file " + path + " belongs to " +
                                        old.model.describe() + ", not to " + model.describe() +
                                        "; choose another --out");
        if (!merged.vecinfer) merged.vecinfer = old.vecinfer;
        if (!merged.spectral) merged.spectral = old.spectral;
        if (!merged.ratequant) merged.ratequant = old.ratequant;
        if (!merged.commvq) merged.commvq = old.commvq;
        if (!merged.rabitq) merged.rabitq = old.rabitq;
    }
    BinaryWriter body;
    write_payload(body, merged);
    write_file_atomic(path, frame(body.buffer()));
}

Calibration Calibration::load(const std::string& path) {
    const std::string data = read_file(path);
    const std::size_t header = sizeof kMagic + 4 + 8 + 4;
    if (data.size() < sizeof kMagic || std::memcmp(data.data(), kMagic, sizeof kMagic) != 0)
        throw std::runtime_error(path + " is not a VeloxQuant calibration file (bad magic)");
    if (data.size() < header)
        throw std::runtime_error(path + ": truncated calibration file (header)");
    BinaryReader head(data.data() + sizeof kMagic, header - sizeof kMagic);
    const auto version = head.get<uint32_t>();
    if (version != kFormatVersion)
        throw std::runtime_error(path + ": unsupported calibration format version " +
                                 std::to_string(version) + " (this build reads " +
                                 std::to_string(kFormatVersion) +
                                 "); recalibrate with `veloxquant calibrate`");
    const auto length = head.get<uint64_t>();
    const auto crc = head.get<uint32_t>();
    if (length != data.size() - header)
        throw std::runtime_error(path + ": truncated calibration file (payload " +
                                 std::to_string(data.size() - header) + " of " +
                                 std::to_string(length) + " bytes)");
    const char* payload = data.data() + header;
    if (crc32(payload, length) != crc)
        throw std::runtime_error(path + ": corrupted calibration file (CRC mismatch)");
    BinaryReader in(payload, length);
    Calibration c;
    try {
        c = read_payload(in);
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(path + ": corrupted calibration file: " + e.what());
    }
    if (in.remaining() != 0)
        throw std::runtime_error(path + ": corrupted calibration file (trailing bytes)");
    return c;
}

void check_calibration_model(const Calibration& calibration, const ModelFingerprint& model) {
    if (calibration.model != model)
        throw std::invalid_argument("the calibration was made for " + calibration.model.describe() +
                                    ", not for this model, " + model.describe() +
                                    "; calibrate this model with `veloxquant calibrate`");
}

void check_calibration_shape(const Calibration& calibration, const ModelShape& shape) {
    const auto& a = calibration.model.shape.layers;
    bool same = a.size() == shape.layers.size();
    for (std::size_t l = 0; same && l < a.size(); ++l)
        same = a[l].num_kv_heads == shape.layers[l].num_kv_heads &&
               a[l].head_dim == shape.layers[l].head_dim;
    if (!same) {
        std::string desc = std::to_string(shape.layers.size()) + " layers";
        if (!shape.layers.empty())
            desc += ", " + std::to_string(shape.layers[0].num_kv_heads) + " KV heads x " +
                    std::to_string(shape.layers[0].head_dim);
        throw std::invalid_argument("the calibration was made for " + calibration.model.describe() +
                                    ", not for a model of " + desc);
    }
}

void apply_calibration(const Calibration& cal, KVCacheConfig& config) {
    const std::string& m = config.method;
    auto missing = [&](const std::string& function) {
        return std::invalid_argument("method '" + m + "' needs a " + m +
                                     " section, which this calibration (" + cal.model.describe() +
                                     ") lacks: " + producer(m, function));
    };
    if (m == "vecinfer") {
        if (!cal.vecinfer)
            throw missing("calibrate_vecinfer in calibration/vecinfer_calibration.h");
        config.codebook = cal.vecinfer->codebook;
        config.smooth_factors = cal.vecinfer->smooth_factors;
        config.num_subspaces = cal.vecinfer->num_subspaces;
        config.bits = cal.vecinfer->bits;
    } else if (m == "spectral") {
        if (!cal.spectral)
            throw missing("calibrate_spectral_rotation in calibration/spectral_calibration.h");
        config.rotations = cal.spectral->rotations;
    } else if (m == "ratequant") {
        if (!cal.ratequant)
            throw missing("calibrate_ratequant in calibration/ratequant_calibration.h");
        config.bit_allocation = cal.ratequant->bit_allocation;
    } else if (m == "commvq") {
        if (!cal.commvq) throw missing("calibrate_commvq in calibration/commvq_calibration.h");
        config.codebook = cal.commvq->codebook;
        config.num_subspaces = cal.commvq->num_codebooks;
        config.bits = cal.commvq->bits;
        config.rope_inv_freq = cal.rope_inv_freq;
    } else if (m == "rabitq") {
        if (!cal.rabitq)
            throw missing("calibrate_rabitq_centroids in calibration/rabitq_calibration.h");
        config.ivf_centroids = cal.rabitq->ivf_centroids;
        config.num_clusters = cal.rabitq->num_clusters;
    }
}

}  // namespace veloxquant
