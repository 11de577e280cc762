#include "model/model_file.h"

#include <set>

#include <fmt/ranges.h>
#include <vector>

#include "io/safetensors.h"

namespace diffmoe {

namespace {

// The host copy of one compute tensor as f32 (what the file stores, whatever the compute dtype).
std::vector<float> host_f32(const Model& m, const Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  switch (t.dtype) {
    case DType::kF32: m.backend().download(out.data(), t); break;
    case DType::kF64: {
      std::vector<double> d(out.size());
      m.backend().download(d.data(), t);
      for (size_t i = 0; i < d.size(); ++i) out[i] = static_cast<float>(d[i]);
      break;
    }
    case DType::kBF16: {
      std::vector<uint16_t> h(out.size());
      m.backend().download(h.data(), t);
      for (size_t i = 0; i < h.size(); ++i) out[i] = bf16_to_f32(h[i]);
      break;
    }
    default: DIFFMOE_FAIL("[save_model] unsupported parameter dtype {}", dtype_name(t.dtype));
  }
  return out;
}

// Loads this rank's part of a parameter (ParamLayout::Entry: expert stacks hold a contiguous range
// of the global tensor) from the file's full tensor.
void set_param_from_file(Model& m, const SafetensorsFile& f, const ParamLayout::Entry& e) {
  const SafetensorsEntry& t = f.get(e.spec.name);
  std::vector<int64_t> want;
  for (int i = 0; i < e.spec.shape.rank(); ++i) want.push_back(e.spec.shape[i]);
  DIFFMOE_CHECK(t.shape == want, "{}: tensor '{}' has shape {}, the model expects {}", f.path(), e.spec.name,
                fmt::join(t.shape, "x"), fmt::join(want, "x"));
  const size_t n = static_cast<size_t>(e.shape.numel()), first = static_cast<size_t>(e.global_offset);
  std::vector<double> v(n);
  switch (t.dtype) {
    case DType::kF32:
      for (size_t i = 0; i < n; ++i) v[i] = static_cast<const float*>(t.data)[first + i];
      break;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) v[i] = static_cast<const double*>(t.data)[first + i];
      break;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) v[i] = bf16_to_f32(static_cast<const uint16_t*>(t.data)[first + i]);
      break;
    default: DIFFMOE_FAIL("{}: tensor '{}' is {}, expected a float dtype", f.path(), e.spec.name, dtype_name(t.dtype));
  }
  m.set_param(e.spec.name, v);
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
  auto load = [&](const ParamLayout::Entry& e) {
    expected.insert(e.spec.name);
    DIFFMOE_CHECK(f.has(e.spec.name), "{}: tensor '{}' is missing", f.path(), e.spec.name);
    set_param_from_file(m, f, e);
  };
  for (const ParamLayout::Entry& e : m.layout().entries()) load(e);
  for (const ParamLayout::Entry& e : m.layout().buffers()) load(e);
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
  DIFFMOE_CHECK(m.layout().options().ep_size == 1,
                "[save_model] {}: this rank holds {} of {} expert ranges; write a sharded checkpoint", path, 1,
                m.layout().options().ep_size);
  SafetensorsWriter w;
  std::vector<std::vector<float>> hold;  // the writer keeps pointers until write()
  hold.reserve(m.specs().size());
  for (const ParamSpec& p : m.specs()) {
    const Tensor t = m.params().get(p.name);
    hold.push_back(host_f32(m, t));
    std::vector<int64_t> shape;
    for (int i = 0; i < t.rank(); ++i) shape.push_back(t.dim(i));
    w.add(p.name, DType::kF32, shape, hold.back().data());
  }
  for (const auto& [k, v] : extra_metadata) w.set_metadata(k, v);
  w.set_metadata("config", m.config().to_json().dump());
  w.write(path);
}

std::unique_ptr<Model> load_model(const std::string& path, Backend& backend, DType dtype, const ModelOptions& opt) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  auto m = std::make_unique<Model>(config_of(f), backend, dtype, opt);
  read_weights(*m, f);
  return m;
}

void load_weights(Model& m, const std::string& path) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  const ModelConfig c = config_of(f);
  DIFFMOE_CHECK(c.to_json() == m.config().to_json(),
                "{}: the file's model config differs from this model's (file vs model: {})", path,
                config_differences(c, m.config()));
  read_weights(m, f);
}

}  // namespace diffmoe
