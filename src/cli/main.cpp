// diffmoe: one binary, one subcommand per job. The only place that exits (docs/style.md habit 7):
// library errors arrive as diffmoe::Error and become one line on stderr and exit code 1.
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <functional>
#include <string>

#include "cli/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"diffmoe: train, evaluate, benchmark and generate with Differential-Transformer MoE language models"};
  app.require_subcommand(1);
  std::function<int()> run;
  diffmoe::cli::add_params_command(app, run);
  diffmoe::cli::add_plan_command(app, run);
  diffmoe::cli::add_train_command(app, run);
  diffmoe::cli::add_eval_command(app, run);
  diffmoe::cli::add_generate_command(app, run);
  diffmoe::cli::add_tokenizer_command(app, run);
  diffmoe::cli::add_data_command(app, run);
  diffmoe::cli::add_init_command(app, run);
  diffmoe::cli::add_checkpoint_command(app, run);
  diffmoe::cli::add_serve_command(app, run);
  diffmoe::cli::add_bench_command(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // A bad command line is an error like any other: one line, naming the option.
    fmt::print(stderr, "error: {} (see --help)\n", e.what());
    return e.get_exit_code();
  }
  try {
    return run();
  } catch (const diffmoe::Error& e) {
    const char* where = std::getenv("DIFFMOE_ERROR_LOCATION");
    if (where != nullptr && std::string(where) == "1" && !e.location().empty()) {
      fmt::print(stderr, "error: {} ({})\n", e.what(), e.location());
    } else {
      fmt::print(stderr, "error: {}\n", e.what());
    }
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
}
