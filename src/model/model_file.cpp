#include "model/model_file.h"

#include <set>
#include <vector>

#include "io/safetensors.h"

namespace diffmoe {

namespace {

// The host copy of one parameter as f32 (what the file stores, whatever the compute dtype).
std::vector<float> host_f32(const Model& m, const Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  if (t.dtype == DType::kF32) {
    m.backend().download(out.data(), t);
  } else {
    DIFFMOE_CHECK(t.dtype == DType::kF64, "[save_model] unsupported parameter dtype {}", dtype_name(t.dtype));
    std::vector<double> d(out.size());
    m.backend().download(d.data(), t);
    for (size_t i = 0; i < d.size(); ++i) out[i] = static_cast<float>(d[i]);
  }
  return out;
}

ModelConfig config_of(const SafetensorsFile& f) {
  auto it = f.metadata().find("config");
  DIFFMOE_CHECK(it != f.metadata().end(), "{}: metadata has no \"config\" entry: not a diffmoe model file", f.path());
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(it->second);
  } catch (const nlohmann::json::exception& e) {
    DIFFMOE_FAIL("{}: metadata \"config\" is not valid JSON: {}", f.path(), e.what());
  }
  return ModelConfig::from_json(j, f.path() + " (metadata config)");
}

void read_weights(Model& m, const SafetensorsFile& f) {
  std::set<std::string> expected;
  for (const ParamSpec& p : m.specs()) {
    expected.insert(p.name);
    DIFFMOE_CHECK(f.has(p.name), "{}: tensor '{}' is missing", f.path(), p.name);
    read_tensor(f, p.name, m.params().get(p.name), m.backend());
  }
  for (const std::string& name : f.names())
    DIFFMOE_CHECK(expected.contains(name), "{}: unexpected tensor '{}' for this config", f.path(), name);
}

}  // namespace

void read_tensor(const SafetensorsFile& f, const std::string& name, const Tensor& dst, Backend& backend) {
  if (dst.device == Device::kCPU) {
    f.read_into(name, dst);
    return;
  }
  Arena staging;
  staging.add("t", dst.shape, dst.dtype);
  staging.allocate(cpu_allocator());
  f.read_into(name, staging.get("t"));
  backend.upload(dst, staging.get("t").data);
}

void save_model(const Model& m, const std::string& path, const std::map<std::string, std::string>& extra_metadata) {
  SafetensorsWriter w;
  std::vector<std::vector<float>> hold;  // the writer keeps pointers until write()
  hold.reserve(m.specs().size());
  for (const ParamSpec& p : m.specs()) {
    const Tensor t = const_cast<Model&>(m).params().get(p.name);
    hold.push_back(host_f32(m, t));
    std::vector<int64_t> shape;
    for (int i = 0; i < t.rank(); ++i) shape.push_back(t.dim(i));
    w.add(p.name, DType::kF32, shape, hold.back().data());
  }
  for (const auto& [k, v] : extra_metadata) w.set_metadata(k, v);
  w.set_metadata("config", m.config().to_json().dump());
  w.write(path);
}

std::unique_ptr<Model> load_model(const std::string& path, Backend& backend, DType dtype) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  auto m = std::make_unique<Model>(config_of(f), backend, dtype);
  read_weights(*m, f);
  return m;
}

void load_weights(Model& m, const std::string& path) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  const ModelConfig c = config_of(f);
  DIFFMOE_CHECK(c.to_json() == m.config().to_json(), "{}: the file's model config differs from this model's:\n  file:  {}\n  model: {}",
                path, c.to_json().dump(), m.config().to_json().dump());
  read_weights(m, f);
}

}  // namespace diffmoe
