#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "backend/cpu/cpu_backend.h"
#include "io/safetensors.h"
#include "micro_config.h"
#include "model/model_file.h"

namespace diffmoe {
namespace {

std::filesystem::path temp_dir() {
  auto d = std::filesystem::temp_directory_path() / ("diffmoe_model_file_" + std::to_string(::getpid()));
  std::filesystem::create_directories(d);
  return d;
}

TEST(ModelFile, SaveThenLoadRebuildsTheModelFromTheFileAlone) {
  CpuBackend be;
  Model m(test::micro_diff_config(), be, DType::kF32);
  m.init_weights(3);
  test::randomize_for_test(m, 4);  // non-trivial biases and norms too
  const std::string path = (temp_dir() / "m.safetensors").string();
  save_model(m, path, {{"step", "42"}});

  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("step"), "42");
  EXPECT_TRUE(f.has("layers.2.ffn.experts.w2"));
  EXPECT_TRUE(f.has("layers.1.ffn.gate.bias"));

  auto back = load_model(path, be, DType::kF32);
  EXPECT_EQ(back->config().to_json(), m.config().to_json());
  for (const ParamSpec& p : m.specs()) {
    const Tensor a = m.params().get(p.name), b = back->params().get(p.name);
    EXPECT_EQ(std::memcmp(a.data, b.data, a.nbytes()), 0) << p.name;
  }
  // f64 loading converts.
  auto m64 = load_model(path, be, DType::kF64);
  EXPECT_EQ(m64->params().get("norm.weight").ptr<double>()[1],
            static_cast<double>(m.params().get("norm.weight").ptr<float>()[1]));
}

TEST(ModelFile, ErrorsNameTheFileAndTensor) {
  CpuBackend be;
  Model m(test::micro_diff_config(), be, DType::kF32);
  m.init_weights(3);
  const auto dir = temp_dir();
  const std::string good = (dir / "good.safetensors").string();
  save_model(m, good);

  // A different config: load_weights refuses with both configs in the message.
  Model other(test::micro_plain_config(), be, DType::kF32);
  try {
    load_weights(other, good);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model config differs"), std::string::npos) << e.what();
  }
  // A file without the config metadata.
  SafetensorsWriter w;
  float x[2] = {1, 2};
  w.add("embed.weight", DType::kF32, {1, 2}, x);
  const std::string bare = (dir / "bare.safetensors").string();
  w.write(bare);
  try {
    load_model(bare, be, DType::kF32);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bare.safetensors: metadata has no \"config\""), std::string::npos)
        << e.what();
  }
  // A truncated file.
  const auto size = std::filesystem::file_size(good);
  const std::string cut = (dir / "cut.safetensors").string();
  std::filesystem::copy_file(good, cut, std::filesystem::copy_options::overwrite_existing);
  std::filesystem::resize_file(cut, size - 100);
  try {
    load_model(cut, be, DType::kF32);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cut.safetensors"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace diffmoe
