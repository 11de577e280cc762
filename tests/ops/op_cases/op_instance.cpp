// OpCase's helpers and OpInstance: a case's tensors on one backend (op_case.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include <fmt/core.h>

#include "core/arena.h"
#include "core/error.h"
#include "core/rng.h"
#include "op_case.h"

namespace diffmoe::opcases {

const Tol& OpCase::tol_for(const std::string& name) const {
  const auto it = tol_of.find(name);
  return it == tol_of.end() ? tol : it->second;
}

const TensorSpec& OpCase::spec(const std::string& name) const {
  for (const TensorSpec& t : tensors)
    if (t.name == name) return t;
  DIFFMOE_FAIL("[op case] {}: no tensor '{}'", label(), name);
}

std::string OpCase::test_name() const {
  // Symbols of the labels spelled out first ("width % 4 != 0" -> width_mod_4_ne_0).
  std::string text = op + "/" + branch + "/" + shape;
  for (const auto& [sym, word] : {std::pair{"!=", " ne "}, std::pair{"%", " mod "}, std::pair{">", " gt "},
                                  std::pair{"*", " x "}, std::pair{".", "p"}}) {
    for (size_t at = text.find(sym); at != std::string::npos; at = text.find(sym, at + 1))
      text.replace(at, std::string(sym).size(), word);
  }
  std::string out;
  bool sep = false;
  for (const char ch : text) {
    const bool word = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
    if (word) {
      if (sep && !out.empty()) out += '_';
      out += ch;
      sep = false;
    } else {
      sep = true;
    }
  }
  return out;
}

double OpCase::bytes(Step s) const {
  double total = 0.0;
  for (const TensorSpec& t : tensors) {
    const double n = static_cast<double>(t.shape.numel()) * static_cast<double>(dtype_size(t.dtype));
    if (t.role == Role::kInput) {
      if (s == Step::kFwd && t.bwd_only) continue;
      total += n;  // read (the forward's inputs are the backward's too)
    } else if (t.step == s) {
      total += t.role == Role::kUpdate ? 2 * n : n;
    } else if (s == Step::kBwd && t.step == Step::kFwd) {
      total += n;  // the forward's saved outputs, read by the backward
    }
  }
  return total;
}

double representable(double v, DType dtype) {
  switch (dtype) {
    case DType::kF32: return static_cast<float>(v);
    case DType::kBF16: return bf16_to_f32(f32_to_bf16(static_cast<float>(v)));
    case DType::kI32: return static_cast<int32_t>(v);
    case DType::kI64: return static_cast<double>(static_cast<int64_t>(v));
    default: return v;
  }
}

namespace {

// The value of element j of a tensor's init (kValues / kComputed come as a whole vector: `full`).
double init_value(const TensorSpec& t, uint64_t seed, const std::vector<double>& full, int64_t j) {
  const uint64_t i = static_cast<uint64_t>(t.init.period > 0 ? j % t.init.period : j);
  switch (t.init.kind) {
    case Init::Kind::kNormal: return t.init.mean + t.init.std * normal_at(seed, 0x7e57, i);
    case Init::Kind::kInts:
      return t.init.lo + static_cast<int32_t>(uniform_at(seed, 0x1d, i) * (t.init.hi - t.init.lo - 1e-9));
    default: return full[static_cast<size_t>(j)];
  }
}

std::vector<double> whole_init(const TensorSpec& t, uint64_t seed) {
  if (t.init.kind == Init::Kind::kValues || t.init.kind == Init::Kind::kComputed) {
    std::vector<double> v = t.init.kind == Init::Kind::kValues ? t.init.values : t.init.fn(seed);
    DIFFMOE_CHECK(static_cast<int64_t>(v.size()) == t.shape.numel(),
                  "[op case] tensor '{}': init gives {} values for {} elements", t.name, v.size(), t.shape.numel());
    return v;
  }
  return {};
}

void store(void* dst, DType dtype, int64_t i, double v) {
  switch (dtype) {
    case DType::kF32: static_cast<float*>(dst)[i] = static_cast<float>(v); break;
    case DType::kF64: static_cast<double*>(dst)[i] = v; break;
    case DType::kBF16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(static_cast<float>(v)); break;
    case DType::kI32: static_cast<int32_t*>(dst)[i] = static_cast<int32_t>(v); break;
    case DType::kI64: static_cast<int64_t*>(dst)[i] = static_cast<int64_t>(v); break;
    default: DIFFMOE_FAIL("[op case] unsupported dtype {}", dtype_name(dtype));
  }
}

double load(const void* src, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kF32: return static_cast<const float*>(src)[i];
    case DType::kF64: return static_cast<const double*>(src)[i];
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::kI32: return static_cast<const int32_t*>(src)[i];
    case DType::kI64: return static_cast<double>(static_cast<const int64_t*>(src)[i]);
    default: DIFFMOE_FAIL("[op case] unsupported dtype {}", dtype_name(dtype));
  }
}

}  // namespace

OpInstance::OpInstance(const OpCase& c, Backend& be, DType float_type) : c_(c), be_(be), float_type_(float_type) {
  for (size_t i = 0; i < c.tensors.size(); ++i) {
    const TensorSpec& t = c.tensors[i];
    const DType dt = dtype_of(t.name);
    const int64_t bytes = (t.offset + t.shape.numel()) * static_cast<int64_t>(dtype_size(dt)) + kGuardBytes;
    arena_.add(fmt::format("t{}", i), Shape{bytes}, DType::kU8);
  }
  arena_.allocate(be.allocator());
  for (size_t i = 0; i < c.tensors.size(); ++i) {
    const TensorSpec& t = c.tensors[i];
    Tensor v = arena_.get(fmt::format("t{}", i));
    v.dtype = dtype_of(t.name);
    v.data = static_cast<char*>(v.data) + t.offset * static_cast<int64_t>(dtype_size(v.dtype));
    v.shape = t.shape;
    views_.push_back(v);
  }
  host_.resize(c.tensors.size());
  have_host_.assign(c.tensors.size(), false);
}

DType OpInstance::dtype_of(const std::string& name) const {
  const DType d = c_.spec(name).dtype;
  return d == DType::kF32 ? float_type_ : d;
}

size_t OpInstance::index(const std::string& name) const {
  for (size_t i = 0; i < c_.tensors.size(); ++i)
    if (c_.tensors[i].name == name) return i;
  DIFFMOE_FAIL("[op case] {}: no tensor '{}'", c_.label(), name);
}

Tensor OpInstance::tensor(const std::string& name) const { return views_[index(name)]; }

Tensor OpInstance::full_view(size_t i) const {
  Tensor t = arena_.get(fmt::format("t{}", i));
  return t;
}

uint64_t OpInstance::seed_of(size_t i) const { return c_.seed * 1000 + i; }

std::vector<double>& OpInstance::host(const std::string& name) {
  const size_t i = index(name);
  if (!have_host_[i]) {
    const TensorSpec& t = c_.tensors[i];
    const std::vector<double> full = whole_init(t, seed_of(i));
    std::vector<double>& v = host_[i];
    v.resize(static_cast<size_t>(t.shape.numel()));
    for (int64_t j = 0; j < t.shape.numel(); ++j)
      v[static_cast<size_t>(j)] = representable(init_value(t, seed_of(i), full, j), views_[i].dtype);
    have_host_[i] = true;
  }
  return host_[i];
}

void OpInstance::init() {
  constexpr int64_t kChunkBytes = int64_t{1} << 26;
  for (size_t i = 0; i < c_.tensors.size(); ++i) {
    const TensorSpec& t = c_.tensors[i];
    const DType dt = views_[i].dtype;
    const int64_t elem = static_cast<int64_t>(dtype_size(dt));
    const Tensor raw = full_view(i);
    const int64_t total = static_cast<int64_t>(raw.nbytes());
    const std::vector<double> full = have_host_[i] ? std::vector<double>{} : whole_init(t, seed_of(i));
    const bool integer = dt == DType::kI32 || dt == DType::kI64;
    // A tiled init repeats its first `period` values: computed once (benchmark-size tensors).
    std::vector<double> pattern;
    if (!have_host_[i] && t.init.period > 0)
      for (int64_t j = 0; j < std::min(t.init.period, t.shape.numel()); ++j)
        pattern.push_back(init_value(t, seed_of(i), full, j));
    // Element e of the buffer: the non-zero values in front of an offset view (they must stay), the
    // tensor (poisoned when the op overwrites it), then the guard bytes.
    const auto element = [&](int64_t e) {
      if (e < t.offset) return 0.5 + 0.25 * static_cast<double>(e);
      const int64_t j = e - t.offset;
      if (t.role == Role::kOutput)
        return integer ? static_cast<double>(kIntPoison) : std::numeric_limits<double>::quiet_NaN();
      if (have_host_[i]) return host_[i][static_cast<size_t>(j)];
      return pattern.empty() ? init_value(t, seed_of(i), full, j) : pattern[static_cast<size_t>(j % t.init.period)];
    };
    const int64_t n_elems = t.offset + t.shape.numel();
    std::vector<uint8_t> bytes;
    for (int64_t off = 0; off < total; off += kChunkBytes) {
      const int64_t len = std::min(kChunkBytes, total - off);  // a multiple of elem: kChunkBytes and the guard are
      bytes.assign(static_cast<size_t>(len), kGuardByte);
      for (int64_t e = off / elem; e < std::min(n_elems, (off + len) / elem); ++e)
        store(bytes.data() + (e * elem - off), dt, 0, element(e));
      Tensor part = raw;
      part.data = static_cast<char*>(raw.data) + off;
      part.shape = Shape{len};
      be_.upload(part, bytes.data());
    }
  }
}

namespace {
Tensors lookup(const OpInstance* inst) {
  return [inst](const std::string& name) { return inst->tensor(name); };
}
}  // namespace

void OpInstance::fwd() { c_.fwd(be_, lookup(this)); }
void OpInstance::bwd() {
  DIFFMOE_CHECK(c_.has_bwd(), "[op case] {}: no backward", c_.label());
  c_.bwd(be_, lookup(this));
}
void OpInstance::sync() { be_.synchronize({}); }

std::vector<double> OpInstance::values(const std::string& name) const {
  const Tensor t = tensor(name);
  std::vector<uint8_t> raw(t.nbytes());
  be_.download(raw.data(), t);
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[static_cast<size_t>(i)] = load(raw.data(), t.dtype, i);
  return v;
}

void OpInstance::set_values(const std::string& name, const std::vector<double>& v) {
  const Tensor t = tensor(name);
  DIFFMOE_CHECK(static_cast<int64_t>(v.size()) == t.numel(), "[op case] {}: set_values('{}') with {} values for {}",
                c_.label(), name, v.size(), t.numel());
  std::vector<uint8_t> raw(t.nbytes());
  for (int64_t i = 0; i < t.numel(); ++i) store(raw.data(), t.dtype, i, v[static_cast<size_t>(i)]);
  be_.upload(t, raw.data());
}

bool OpInstance::guard_intact(const std::string& name) const {
  const size_t i = index(name);
  const TensorSpec& t = c_.tensors[i];
  const Tensor raw = full_view(i);
  std::vector<uint8_t> bytes(raw.nbytes());
  be_.download(bytes.data(), raw);
  const size_t elem = dtype_size(views_[i].dtype);
  for (int64_t j = 0; j < t.offset; ++j) {
    std::vector<uint8_t> want(elem);
    store(want.data(), views_[i].dtype, 0, 0.5 + 0.25 * static_cast<double>(j));
    if (std::memcmp(want.data(), bytes.data() + static_cast<size_t>(j) * elem, elem) != 0) return false;
  }
  for (size_t j = bytes.size() - kGuardBytes; j < bytes.size(); ++j)
    if (bytes[j] != kGuardByte) return false;
  return true;
}

std::vector<std::string> OpInstance::written_by(Step s) const {
  std::vector<std::string> names;
  for (const TensorSpec& t : c_.tensors)
    if (t.role != Role::kInput && t.step == s) names.push_back(t.name);
  return names;
}

double case_loss(const OpInstance& inst) {
  const OpCase& c = inst.op_case();
  if (c.loss) return c.loss(inst);
  double s = 0.0;
  for (const auto& [out, dout] : c.upstream) {
    const std::vector<double> a = inst.values(out), b = inst.values(dout);
    for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  }
  return s;
}

}  // namespace diffmoe::opcases
