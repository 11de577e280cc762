// YAML config files (io/config_file.h) and the run config read from them (train/train_config.h):
// parse, check every key, and the emitter's promise that to_yaml's text parses back to the same
// value (a run's saved config.yaml must be readable by the next run).
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/config_file.h"
#include "train/train_config.h"

using diffmoe::Error;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::ordered_json doc;
  try {
    doc = diffmoe::parse_yaml(diffmoe::fuzz::as_text(data, size), "fuzz.yaml");
  } catch (const Error&) {
    return 0;
  }
  // Round trip. dump() with replacement: strings may hold bytes that are not UTF-8.
  const auto text_of = [](const nlohmann::ordered_json& j) {
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  };
  nlohmann::ordered_json back;
  try {
    back = diffmoe::parse_yaml(diffmoe::to_yaml(doc), "fuzz.yaml (as written back)");
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    diffmoe::fuzz::finding("to_yaml wrote text that parse_yaml rejects");
  }
  if (text_of(back) != text_of(doc)) diffmoe::fuzz::finding("to_yaml then parse_yaml changed the value");
  try {
    const diffmoe::RunConfig rc = diffmoe::run_config_from_json(doc, "fuzz.yaml");
    (void)diffmoe::to_yaml(rc.resolved);
  } catch (const Error&) {
  }
  return 0;
}
