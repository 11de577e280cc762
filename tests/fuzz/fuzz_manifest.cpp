// Checkpoint manifests and the `latest` pointer (io/checkpoint.h): the input is
// <latest pointer text> '\n' '\n' <manifest.json text>, in a checkpoint root holding one step
// directory with two small files (a.bin = "hello", trainer_state.json = "{}\n"). Both
// open_checkpoint and find_latest_checkpoint must either verify or refuse it with an Error.
#include <filesystem>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fs = std::filesystem;
  const std::string root = diffmoe::fuzz::scratch_dir() + "/ckpt";
  const std::string dir = root + "/step_000000001";
  static const bool made = [&] {
    fs::create_directories(dir);
    diffmoe::fuzz::write_file(dir + "/a.bin", "hello");
    diffmoe::fuzz::write_file(dir + "/trainer_state.json", "{}\n");
    return true;
  }();
  (void)made;
  const std::string_view in = diffmoe::fuzz::as_text(data, size);
  const size_t split = in.find("\n\n");
  const std::string_view latest = split == std::string_view::npos ? std::string_view() : in.substr(0, split);
  const std::string_view manifest = split == std::string_view::npos ? in : in.substr(split + 2);
  diffmoe::fuzz::write_file(root + "/latest", latest);
  diffmoe::fuzz::write_file(dir + "/manifest.json", manifest);
  try {
    const diffmoe::CheckpointInfo info = diffmoe::open_checkpoint(dir);
    for (const auto& name : info.files) (void)info.path_of(name);
  } catch (const diffmoe::Error&) {
  }
  try {
    std::vector<std::string> warnings;
    (void)diffmoe::find_latest_checkpoint(root, &warnings);
    (void)diffmoe::resolve_resume("latest", root, &warnings);
  } catch (const diffmoe::Error&) {
  }
  return 0;
}
