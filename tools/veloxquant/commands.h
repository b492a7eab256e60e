// Subcommands of the veloxquant command-line tool.
#pragma once

#include <CLI/CLI.hpp>

namespace veloxquant::cli {

/// `veloxquant synthetic`: every method on synthetic keys/values, one table.
void register_synthetic(CLI::App& app);

}  // namespace veloxquant::cli
