// nanobind bindings of calibration: the Calibration file object (veloxquant/calibration.h) and
// calibrate(), which runs a GGUF model over a text and learns one method's section exactly as
// `veloxquant calibrate` does (src/calibration: collect_activations, then calibrate_method).
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "calibration/calibrate.h"
#include "calibration/collect.h"
#include "model/llama_model.h"
#include "model/tokenizer.h"
#include "veloxquant/calibration.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace veloxquant;

namespace {

ModelShape shape_from_pairs(const std::vector<std::pair<int, int>>& pairs) {
    ModelShape shape;
    for (const auto& [heads, dim] : pairs) shape.layers.push_back({heads, dim});
    return shape;
}

KVCacheConfig applied(const Calibration& cal, const KVCacheConfig& config) {
    KVCacheConfig out = config;
    apply_calibration(cal, out);
    return out;
}

/// `veloxquant calibrate` without the CLI: tokenizes `text` with the model's own tokenizer,
/// keeps the first `tokens` (0 = all), collects activations and calibrates config.method.
Calibration calibrate_model(const LlamaModel& model, const std::string& text,
                            const KVCacheConfig& config, double bits, int64_t tokens, int ctx,
                            int max_rows) {
    const auto& known = calibrated_methods();
    if (std::find(known.begin(), known.end(), config.method) == known.end()) {
        std::string names;
        for (const auto& k : known) names += (names.empty() ? "" : ", ") + k;
        throw std::invalid_argument("method '" + config.method +
                                    "' has nothing to calibrate (checked before running the "
                                    "model); calibrated methods: " +
                                    names);
    }
    if (tokens < 0)
        throw std::invalid_argument("tokens must be >= 0, got " + std::to_string(tokens));
    const BPETokenizer tokenizer(vocab_from_gguf(model.gguf()));
    std::vector<int32_t> ids = tokenizer.encode(text, false);
    if (tokens > 0 && static_cast<int64_t>(ids.size()) > tokens)
        ids.resize(static_cast<std::size_t>(tokens));
    CollectOptions options;
    options.ctx = ctx;
    options.max_kv_rows = max_rows;
    options.max_query_rows = max_rows;
    options.seed = config.seed;
    const Activations acts = collect_activations(model, ids, options);
    Calibration cal;
    cal.model = model_fingerprint(model);
    cal.rope_inv_freq = acts.rope.inv_freq;
    calibrate_method(acts, config, cal, bits);
    return cal;
}

}  // namespace

void bind_calibration(nb::module_& m) {
    nb::class_<Calibration>(
        m, "Calibration",
        "What the calibrated methods learned from one model (sections vecinfer, spectral, "
        "ratequant, commvq, rabitq) with the model's fingerprint; versioned, CRC-checked files.")
        .def_static("load", &Calibration::load, "path"_a, nb::call_guard<nb::gil_scoped_release>(),
                    "Reads a calibration file (RuntimeError naming the file and the problem for a "
                    "missing, truncated, corrupted, forged or wrong-version file).")
        .def("save", &Calibration::save, "path"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Writes atomically, keeping the other sections of a file of the same model "
             "(ValueError naming both models for a file of another model).")
        .def("sections", &Calibration::sections)
        .def_prop_ro("model", [](const Calibration& c) { return c.model.describe(); })
        .def_prop_ro("shape",
                     [](const Calibration& c) {
                         std::vector<std::pair<int, int>> out;
                         for (const auto& l : c.model.shape.layers)
                             out.emplace_back(l.num_kv_heads, l.head_dim);
                         return out;
                     })
        .def("apply", &applied, "config"_a,
             "A copy of the C++ config with config.method's calibrated fields filled (ValueError "
             "naming the calibrate command when the section is missing).")
        .def(
            "check_shape",
            [](const Calibration& c, const std::vector<std::pair<int, int>>& shape) {
                check_calibration_shape(c, shape_from_pairs(shape));
            },
            "shape"_a,
            "ValueError unless the (num_kv_heads, head_dim) per layer match the model's.");

    m.def("calibrated_methods", &calibrated_methods, "Methods calibrate() knows.");
    m.def(
        "calibrate", &calibrate_model, "model"_a, "text"_a, "config"_a, "bits"_a, "tokens"_a,
        "ctx"_a, "max_rows"_a, nb::call_guard<nb::gil_scoped_release>(),
        "Runs the model over the text and calibrates config.method (see veloxquant.calibration).");
}
