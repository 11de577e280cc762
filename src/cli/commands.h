// The diffmoe subcommands. Each registers itself on the CLI11 app and returns the exit code.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>

namespace diffmoe::cli {

// Adds the subcommand; `run` is set to the function main() calls when it was chosen.
void add_params_command(CLI::App& app, std::function<int()>& run);
void add_plan_command(CLI::App& app, std::function<int()>& run);
void add_init_command(CLI::App& app, std::function<int()>& run);
void add_train_command(CLI::App& app, std::function<int()>& run);
void add_eval_command(CLI::App& app, std::function<int()>& run);
void add_generate_command(CLI::App& app, std::function<int()>& run);
void add_tokenizer_command(CLI::App& app, std::function<int()>& run);
void add_data_command(CLI::App& app, std::function<int()>& run);
void add_checkpoint_command(CLI::App& app, std::function<int()>& run);
void add_serve_command(CLI::App& app, std::function<int()>& run);
void add_bench_command(CLI::App& app, std::function<int()>& run);

}  // namespace diffmoe::cli
