// Subcommands of the veloxquant command-line tool.
#pragma once

#include <CLI/CLI.hpp>

namespace veloxquant::cli {

/// `veloxquant synthetic`: every method on synthetic keys/values, one table.
void register_synthetic(CLI::App& app);
/// `veloxquant generate`: prompt in, streamed text out, through any cache.
void register_generate(CLI::App& app);
/// `veloxquant eval`: one configuration against the fp16 cache on a text (and needles).
void register_eval(CLI::App& app);
/// `veloxquant compare`: the main job, every method and bit width as one table.
void register_compare(CLI::App& app);
/// `veloxquant info`: model hyper-parameters, tensor types, KV bytes per method.
void register_info(CLI::App& app);
/// `veloxquant calibrate`: a method's calibration from a model's activations, into a file.
void register_calibrate(CLI::App& app);

}  // namespace veloxquant::cli
