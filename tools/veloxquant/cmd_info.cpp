// `veloxquant info`: model hyper-parameters, tensor types, and the KV bytes per token of every
// method in the main comparison's sweep on this model.
#include <algorithm>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "config_options.h"

namespace veloxquant::cli {
namespace {

struct Options {
    std::string model = kDefaultModel;
    std::string json_path;
    std::string calibration;
};

void run(const Options& o) {
    const LoadedModel m = load_model(o.model);
    const LlamaModel& model = *m.model;
    const LlamaHParams& hp = model.hparams();
    const GGUFFile& gguf = model.gguf();
    const ModelShape shape = model.cache_shape();

    const nlohmann::json hparams = {{"architecture", gguf.get_string("general.architecture")},
                                    {"n_vocab", hp.n_vocab},
                                    {"n_ctx_train", hp.n_ctx_train},
                                    {"n_embd", hp.n_embd},
                                    {"n_layer", hp.n_layer},
                                    {"n_head", hp.n_head},
                                    {"n_head_kv", hp.n_head_kv},
                                    {"head_dim", hp.head_dim},
                                    {"n_ff", hp.n_ff},
                                    {"rope_dim", hp.rope_dim},
                                    {"rope_freq_base", hp.rope_freq_base},
                                    {"rope_freq_scale", hp.rope_freq_scale},
                                    {"rms_eps", hp.rms_eps},
                                    {"tied_embeddings", hp.tied_embeddings}};
    std::cout << "model " << o.model << " (GGUF v" << gguf.version() << ", "
              << (gguf.has("general.name") ? gguf.get_string("general.name") : "unnamed") << ")\n";
    for (const auto& [key, value] : hparams.items())
        std::cout << "  " << std::left << std::setw(16) << key << value << "\n";
    std::cout << "weights: " << std::fixed << std::setprecision(1)
              << model.weight_bytes() / (1024.0 * 1024.0) << " MiB in " << gguf.tensors().size()
              << " tensors:";
    const std::map<std::string, int> histogram = gguf.type_histogram();
    for (const auto& [type, count] : histogram) std::cout << " " << type << " x" << count;
    std::cout << "\n\nKV cache per token (" << shape.layers.size()
              << " layers; bits per coordinate count every norm, scale and id):\n"
              << std::left << std::setw(40) << "config" << std::right << std::setw(8) << "K bits"
              << std::setw(8) << "V bits" << std::setw(12) << "bytes/tok" << std::setw(9)
              << "vs fp16"
              << "\n";

    // vecinfer, spectral and commvq have no cache without a calibration of this model: they are
    // listed when --calibration covers them, and named at the end otherwise.
    std::vector<NamedConfig> sweep = sweep_configs(kSweepMethods, kSweepBits, hp.head_dim);
    apply_calibration_file(o.calibration, model, sweep);
    std::vector<NamedConfig> configs = {baseline_config()};
    std::vector<std::string> uncalibrated;
    for (NamedConfig& c : sweep) {
        const std::string& m = c.config.method;
        const bool calibrated = c.label.find("(calibrated)") != std::string::npos;
        if ((m == "vecinfer" || m == "spectral" || m == "commvq") && !calibrated) {
            if (std::find(uncalibrated.begin(), uncalibrated.end(), m) == uncalibrated.end())
                uncalibrated.push_back(m);
            continue;
        }
        configs.push_back(std::move(c));
    }
    nlohmann::json caches = nlohmann::json::array();
    double fp16_bytes = 0.0;
    for (const NamedConfig& c : configs) {
        const CacheFootprint f = measure_footprint(model.make_caches(c.config, 1));
        if (fp16_bytes == 0.0) fp16_bytes = f.code_bytes_per_token;
        std::cout << std::left << std::setw(40) << c.label << std::right << std::setprecision(2)
                  << std::setw(8) << f.key_bits << std::setw(8) << f.value_bits
                  << std::setprecision(1) << std::setw(12) << f.code_bytes_per_token << std::setw(8)
                  << fp16_bytes / f.code_bytes_per_token << "x\n";
        caches.push_back({{"label", c.label},
                          {"config", config_json(c.config)},
                          {"key_bits_per_coordinate", f.key_bits},
                          {"value_bits_per_coordinate", f.value_bits},
                          {"kv_bytes_per_token", f.code_bytes_per_token},
                          {"parameter_bytes", f.parameter_bytes}});
    }
    if (!uncalibrated.empty()) {
        std::cout << "not listed (need a calibration of this model; pass --calibration FILE from "
                     "`veloxquant calibrate`):";
        for (const std::string& m : uncalibrated) std::cout << " " << m;
        std::cout << "\n";
    }
    if (o.json_path.empty()) return;
    write_json(o.json_path, {{"model", o.model},
                             {"gguf_version", gguf.version()},
                             {"hparams", hparams},
                             {"weight_bytes", model.weight_bytes()},
                             {"tensor_count", gguf.tensors().size()},
                             {"tensor_types", histogram},
                             {"kv_caches", caches}});
}

}  // namespace

void register_info(CLI::App& app) {
    auto o = std::make_shared<Options>();
    CLI::App* sub =
        app.add_subcommand("info", "Model hyper-parameters, tensor types and KV bytes per method");
    sub->add_option("--model", o->model, "Llama-family GGUF model")->capture_default_str();
    sub->add_option("--json", o->json_path, "also write the facts as JSON to this file");
    add_calibration_option(sub, o->calibration);
    sub->callback([o] { run(*o); });
}

}  // namespace veloxquant::cli
