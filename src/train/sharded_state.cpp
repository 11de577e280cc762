#include "train/sharded_state.h"

#include <algorithm>
#include <charconv>
#include <filesystem>

#include <fmt/format.h>

namespace diffmoe {

namespace fs = std::filesystem;

std::string shard_file_name(int64_t rank, int64_t world) {
  return fmt::format("shard-{:05d}-of-{:05d}.safetensors", rank, world);
}

namespace {

constexpr const char* kKindPrefix[] = {"master", "m", "v", "buffer"};

// The host copy of a float tensor in its own dtype (f32 or f64), as bytes.
std::vector<char> download_bytes(Backend& be, const Tensor& t) {
  std::vector<char> out(t.nbytes());
  if (!out.empty()) be.download(out.data(), t);
  return out;
}

void convert_to_double(DType dt, const void* src, size_t first, size_t n, double* out, const std::string& what) {
  switch (dt) {
    case DType::kF32:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<const float*>(src)[first + i];
      return;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<const double*>(src)[first + i];
      return;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) out[i] = bf16_to_f32(static_cast<const uint16_t*>(src)[first + i]);
      return;
    default: DIFFMOE_FAIL("{}: dtype {} is not a float type", what, dtype_name(dt));
  }
}

// Values into a state tensor of its dtype: f64 as they are, f32 rounded to nearest, bf16 (moments,
// optim.moment_dtype) rounded to f32 and then to bf16 (nearest even), as the AdamW op stores them:
// values read from bf16 come back bit for bit, values read from f32 are rounded once.
void upload_from_double(Backend& be, const Tensor& dst, const std::vector<double>& v) {
  if (dst.dtype == DType::kF64) {
    be.upload(dst, v.data());
    return;
  }
  if (dst.dtype == DType::kBF16) {
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = f32_to_bf16(static_cast<float>(v[i]));
    be.upload(dst, b.data());
    return;
  }
  DIFFMOE_CHECK(dst.dtype == DType::kF32, "[checkpoint] optimizer state of dtype {}", dtype_name(dst.dtype));
  std::vector<float> f(v.begin(), v.end());
  be.upload(dst, f.data());
}

ModelConfig config_from_metadata(const SafetensorsFile& f) {
  auto it = f.metadata().find("config");
  DIFFMOE_CHECK(it != f.metadata().end(), "{}: metadata has no \"config\" entry: not a diffmoe checkpoint file",
                f.path());
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(it->second);
  } catch (const nlohmann::json::exception& e) {
    DIFFMOE_FAIL("{}: metadata \"config\" is not valid JSON: {}", f.path(), e.what());
  }
  return ModelConfig::from_json(j, f.path() + " (metadata config)");
}

}  // namespace

void write_state_shard(const AdamW& opt, const std::string& path, int64_t rank, int64_t world, bool with_buffers,
                       const std::map<std::string, std::string>& extra_metadata) {
  Model& m = opt.model();
  Backend& be = m.backend();
  const ParamLayout& layout = m.layout();
  SafetensorsWriter w;
  std::vector<std::vector<char>> hold;  // the writer keeps pointers until write()
  hold.reserve(opt.pieces().size() * 3 + layout.buffers().size());
  for (const AdamW::Piece& p : opt.pieces()) {
    const std::string tail = fmt::format("{}/{}", layout.entries()[p.entry].spec.name, p.global_begin(layout));
    const Tensor views[] = {opt.master(p), opt.moment1(p), opt.moment2(p)};
    for (int k = 0; k < 3; ++k) {
      // A separate master is f32; a group whose compute weights are the masters is the float type.
      const Tensor& t = views[k];
      hold.push_back(download_bytes(be, t));
      w.add(fmt::format("{}/{}", kKindPrefix[k], tail), t.dtype, {p.count}, hold.back().data());
    }
  }
  if (with_buffers) {
    for (const ParamLayout::Entry& e : layout.buffers()) {
      const Tensor t = m.params().get(e.spec.name);
      hold.push_back(download_bytes(be, t));
      w.add(fmt::format("buffer/{}/0", e.spec.name), t.dtype, {t.numel()}, hold.back().data());
    }
  }
  w.set_metadata("config", m.config().to_json().dump());
  w.set_metadata("rank", std::to_string(rank));
  w.set_metadata("world", std::to_string(world));
  w.set_metadata("ep", std::to_string(layout.options().ep_size));
  w.set_metadata("step", std::to_string(opt.steps_taken()));
  for (const auto& [k, v] : extra_metadata) w.set_metadata(k, v);
  w.write(path);
}

StateReader::StateReader(const std::string& dir) : dir_(dir) {
  std::vector<std::string> shards;
  std::error_code ec;
  for (const auto& de : fs::directory_iterator(dir, ec)) {
    const std::string n = de.path().filename().string();
    if (n.rfind("shard-", 0) == 0 && n.ends_with(".safetensors")) shards.push_back(de.path().string());
  }
  DIFFMOE_CHECK(!ec, "{}: cannot list the checkpoint directory: {}", dir, ec.message());
  std::sort(shards.begin(), shards.end());
  const bool legacy = shards.empty();
  if (legacy) {
    DIFFMOE_CHECK(fs::exists(dir + "/model.safetensors"),
                  "{}: no shard-*.safetensors and no model.safetensors: not a checkpoint", dir);
    shards.push_back(dir + "/model.safetensors");
    if (fs::exists(dir + "/optimizer.safetensors")) shards.push_back(dir + "/optimizer.safetensors");
  }
  for (const std::string& path : shards) files_.push_back(SafetensorsFile::open(path));
  config_ = config_from_metadata(files_.front());
  std::map<std::string, bool> is_buffer;
  for (const ParamSpec& p : parameter_specs(config_)) {
    numel_[p.name] = p.shape.numel();
    is_buffer[p.name] = !p.trainable();
  }
  if (!legacy) {  // every shard must describe the same model and the same world
    const std::string world = files_.front().metadata().contains("world") ? files_.front().metadata().at("world") : "";
    DIFFMOE_CHECK(std::to_string(files_.size()) == world, "{}: {} shard files, but {} says the world had {} ranks", dir,
                  files_.size(), files_.front().path(), world);
    for (const SafetensorsFile& f : files_) {
      DIFFMOE_CHECK(config_from_metadata(f).to_json() == config_.to_json(), "{}: its model config differs from {}'s",
                    f.path(), files_.front().path());
    }
  }
  for (size_t fi = 0; fi < files_.size(); ++fi) {
    const SafetensorsFile& f = files_[fi];
    for (const std::string& name : f.names()) {
      int kind = -1;
      std::string param;
      int64_t first = 0;
      if (!legacy) {
        const size_t a = name.find('/'), b = name.rfind('/');
        DIFFMOE_CHECK(a != std::string::npos && b > a, "{}: tensor '{}' is not <kind>/<param>/<first>", f.path(), name);
        const std::string k = name.substr(0, a);
        for (int i = 0; i < 4; ++i)
          if (k == kKindPrefix[i]) kind = i;
        param = name.substr(a + 1, b - a - 1);
        const auto [ptr, err] = std::from_chars(name.data() + b + 1, name.data() + name.size(), first);
        DIFFMOE_CHECK(kind >= 0 && err == std::errc() && ptr == name.data() + name.size() && first >= 0,
                      "{}: tensor '{}' is not <master|m|v|buffer>/<param>/<first>", f.path(), name);
      } else if (fi == 0) {
        param = name;
        kind = is_buffer.contains(name) && is_buffer[name] ? static_cast<int>(Kind::kBuffer)
                                                           : static_cast<int>(Kind::kMaster);
      } else {
        DIFFMOE_CHECK(name.size() > 2 && (name[0] == 'm' || name[0] == 'v') && name[1] == '.',
                      "{}: unexpected tensor '{}'", f.path(), name);
        kind = name[0] == 'm' ? static_cast<int>(Kind::kMoment1) : static_cast<int>(Kind::kMoment2);
        param = name.substr(2);
      }
      DIFFMOE_CHECK(numel_.contains(param), "{}: tensor '{}' names '{}', which this model config does not have",
                    f.path(), name, param);
      const SafetensorsEntry& e = f.get(name);
      int64_t count = 1;
      for (int64_t d : e.shape) count *= d;
      DIFFMOE_CHECK(first + count <= numel_[param], "{}: tensor '{}' covers elements [{}, {}) of '{}', which has {}",
                    f.path(), name, first, first + count, param, numel_[param]);
      if (kind == static_cast<int>(Kind::kMoment1) || kind == static_cast<int>(Kind::kMoment2)) {
        // One dtype for every moment (optim.moment_dtype of the run that wrote them).
        DIFFMOE_CHECK(!has_moments_ || e.dtype == moment_dtype_,
                      "{}: tensor '{}' is {}, but the checkpoint's other moments are {}", f.path(), name,
                      dtype_name(e.dtype), dtype_name(moment_dtype_));
        has_moments_ = true;
        moment_dtype_ = e.dtype;
      }
      slices_[{kind, param}].push_back(Slice{.first = first, .count = count, .file = fi, .tensor = name});
    }
  }
  for (auto& [key, v] : slices_)
    std::sort(v.begin(), v.end(), [](const Slice& a, const Slice& b) { return a.first < b.first; });
}

int64_t StateReader::numel(const std::string& param) const {
  auto it = numel_.find(param);
  DIFFMOE_CHECK(it != numel_.end(), "{}: the checkpoint's model has no parameter '{}'", dir_, param);
  return it->second;
}

void StateReader::read(Kind kind, const std::string& param, int64_t first, int64_t count, double* out) const {
  auto it = slices_.find({static_cast<int>(kind), param});
  DIFFMOE_CHECK(it != slices_.end(), "{}: no {} values of '{}' in the checkpoint", dir_,
                kKindPrefix[static_cast<int>(kind)], param);
  int64_t cur = first;
  const int64_t end = first + count;
  for (const Slice& s : it->second) {
    if (s.first + s.count <= cur) continue;
    if (s.first > cur) break;  // a gap before this slice
    const int64_t stop = std::min(end, s.first + s.count);
    const SafetensorsFile& f = files_[s.file];
    const SafetensorsEntry& e = f.get(s.tensor);
    convert_to_double(e.dtype, e.data, static_cast<size_t>(cur - s.first), static_cast<size_t>(stop - cur),
                      out + (cur - first), f.path() + ": " + s.tensor);
    cur = stop;
    if (cur == end) return;
  }
  DIFFMOE_CHECK(cur >= end, "{}: the checkpoint's {} values of '{}' do not cover element {} (of [{}, {}))", dir_,
                kKindPrefix[static_cast<int>(kind)], param, cur, first, end);
}

std::optional<std::string> moment_dtype_change(const AdamW& opt, const StateReader& reader) {
  if (!reader.has_moments() || reader.moment_dtype() == opt.moment_dtype()) return std::nullopt;
  const bool narrows = dtype_size(opt.moment_dtype()) < dtype_size(reader.moment_dtype());
  return fmt::format(
      "the checkpoint's Adam moments are {}, this run's optim.moment_dtype makes them {}: converting ({})",
      dtype_name(reader.moment_dtype()), dtype_name(opt.moment_dtype()), narrows ? "rounded to nearest even" : "exact");
}

void load_state(AdamW& opt, const StateReader& reader, Context ctx) {
  Model& m = opt.model();
  DIFFMOE_CHECK(reader.config().to_json() == m.config().to_json(),
                "{}: the checkpoint's model config differs from this run's (checkpoint vs run: {})", reader.dir(),
                config_differences(reader.config(), m.config()));
  const ParamLayout& layout = m.layout();
  Backend& be = m.backend();
  std::vector<double> v;
  for (const AdamW::Piece& p : opt.pieces()) {
    const std::string& name = layout.entries()[p.entry].spec.name;
    v.resize(static_cast<size_t>(p.count));
    const int64_t g0 = p.global_begin(layout);
    reader.read(StateReader::Kind::kMaster, name, g0, p.count, v.data());
    upload_from_double(be, opt.master(p), v);
    if (reader.has_moments()) {
      reader.read(StateReader::Kind::kMoment1, name, g0, p.count, v.data());
      upload_from_double(be, opt.moment1(p), v);
      reader.read(StateReader::Kind::kMoment2, name, g0, p.count, v.data());
      upload_from_double(be, opt.moment2(p), v);
    }
  }
  for (const ParamLayout::Entry& e : layout.buffers()) {
    v.resize(static_cast<size_t>(e.shape.numel()));
    reader.read(StateReader::Kind::kBuffer, e.spec.name, 0, e.shape.numel(), v.data());
    m.set_param(e.spec.name, v);
  }
  opt.write_compute_weights(ctx);
}

void export_model(const StateReader& reader, const std::string& path,
                  const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter w;
  std::vector<std::vector<float>> hold;  // the writer keeps pointers until write()
  const std::vector<ParamSpec> specs = parameter_specs(reader.config());
  hold.reserve(specs.size());
  std::vector<double> v;
  for (const ParamSpec& p : specs) {
    const int64_t n = p.shape.numel();
    v.resize(static_cast<size_t>(n));
    reader.read(p.trainable() ? StateReader::Kind::kMaster : StateReader::Kind::kBuffer, p.name, 0, n, v.data());
    hold.emplace_back(v.begin(), v.end());
    std::vector<int64_t> shape;
    for (int i = 0; i < p.shape.rank(); ++i) shape.push_back(p.shape[i]);
    w.add(p.name, DType::kF32, shape, hold.back().data());
  }
  for (const auto& [k, val] : metadata) w.set_metadata(k, val);
  w.set_metadata("config", reader.config().to_json().dump());
  w.write(path);
}

void load_model_weights(Model& model, const StateReader& reader) {
  DIFFMOE_CHECK(reader.config().to_json() == model.config().to_json(),
                "{}: the checkpoint's model config differs from the model's ({})", reader.dir(),
                config_differences(reader.config(), model.config()));
  std::vector<double> v;
  auto load = [&](const ParamLayout::Entry& e, StateReader::Kind kind) {
    v.resize(static_cast<size_t>(e.shape.numel()));
    reader.read(kind, e.spec.name, e.global_offset, e.shape.numel(), v.data());
    model.set_param(e.spec.name, v);
  };
  for (const ParamLayout::Entry& e : model.layout().entries()) load(e, StateReader::Kind::kMaster);
  for (const ParamLayout::Entry& e : model.layout().buffers()) load(e, StateReader::Kind::kBuffer);
}

}  // namespace diffmoe
