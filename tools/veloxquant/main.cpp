// veloxquant: command-line front of the library.
#include <CLI/CLI.hpp>
#include <exception>
#include <iostream>

#include "commands.h"

int main(int argc, char** argv) {
    CLI::App app{"VeloxQuant: compressed key/value caches for transformer inference"};
    app.require_subcommand(1);
    veloxquant::cli::register_synthetic(app);
    veloxquant::cli::register_generate(app);
    veloxquant::cli::register_eval(app);
    veloxquant::cli::register_compare(app);
    veloxquant::cli::register_info(app);
    veloxquant::cli::register_calibrate(app);
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e);
    } catch (const std::exception& e) {
        std::cerr << "veloxquant: error: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
