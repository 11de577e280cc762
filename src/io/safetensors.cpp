// safetensors reader and writer (docs/formats.md §1b).
//
// Reader: the file is mmap'ed read-only and the JSON header is validated the way the reference
// reader (`Metadata::validate` in huggingface/safetensors) does it, so a file we accept is one that
// Python accepts too: header size bounded and inside the file, header starts with '{', a JSON
// object without duplicate keys, "__metadata__" a string->string map, every tensor with a known
// dtype, a non-negative shape and data_offsets whose length is numel·itemsize, and the byte buffer
// entirely indexed (sorted by offset, contiguous from 0, no holes, no overlaps, no trailing bytes).
// Every error message starts with the file path and names the tensor and field at fault.
//
// Writer: tensors ordered by dtype size descending, then name, so each tensor is naturally aligned
// once the header is padded with spaces to make 8 + N a multiple of 8. The file is written to
// <path>.tmp.<pid>, fsync'ed, renamed over <path> and the directory fsync'ed, so a reader never
// sees a partial file and a crash leaves either the old or the new file.
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <utility>

#include "core/error.h"
#include "io/file_util.h"

namespace diffmoe {

// The format is little-endian (docs/formats.md §1b); we copy bytes straight from the map.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace {

constexpr uint64_t kMaxHeaderSize = 100'000'000;  // MAX_HEADER_SIZE of the reference reader
constexpr size_t kSizeFieldBytes = 8;             // the leading u64 header size
constexpr size_t kHeaderAlignment = 8;            // the writer pads so that data starts 8-aligned

constexpr const char* kMetadataKey = "__metadata__";

// Our dtypes and their safetensors names, in the order used by the "supported" list of errors.
constexpr std::pair<DType, const char*> kDTypeNames[] = {
    {DType::kF32, "F32"}, {DType::kF64, "F64"}, {DType::kBF16, "BF16"}, {DType::kF8E4M3, "F8_E4M3"},
    {DType::kI32, "I32"}, {DType::kI64, "I64"}, {DType::kU8, "U8"},
};

std::string supported_dtype_list() {
  std::string s;
  for (const auto& [t, name] : kDTypeNames) s += fmt::format("{}{}", s.empty() ? "" : ", ", name);
  return s;
}

std::string shape_str(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

std::string shape_str(const Shape& shape) { return shape.str(); }

// numel of a shape, or nullopt if it overflows int64 (a hostile header must not wrap around).
std::optional<int64_t> checked_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape)
    if (__builtin_mul_overflow(n, d, &n)) return std::nullopt;
  return n;
}

// A non-negative JSON integer as uint64 (JSON "2.0", "-1" or "x" are rejected by the caller).
std::optional<uint64_t> as_non_negative_int(const nlohmann::json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return static_cast<uint64_t>(v.get<int64_t>());
  return std::nullopt;
}

// Parses the header JSON, rejecting duplicate keys at any depth (docs/formats.md §1b: "Duplicate keys
// are disallowed"; nlohmann would silently keep the last one). Returns the first duplicate, if any.
nlohmann::json parse_header_json(std::string_view text, const std::string& path) {
  std::vector<std::set<std::string>> open_objects;  // keys seen in each object being parsed
  std::optional<std::string> duplicate;
  auto callback = [&](int /*depth*/, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (event == E::object_start) open_objects.emplace_back();
    if (event == E::object_end && !open_objects.empty()) open_objects.pop_back();
    if (event == E::key && !open_objects.empty() && !open_objects.back().insert(parsed.get<std::string>()).second &&
        !duplicate)
      duplicate = parsed.get<std::string>();
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const nlohmann::json::exception& e) {
    DIFFMOE_FAIL("{}: header is not valid JSON: {}", path, e.what());
  }
  DIFFMOE_CHECK(!duplicate, "{}: header has a duplicate key '{}'", path, *duplicate);
  return header;
}

// Validates one tensor entry of the header (everything except its place in the buffer).
SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const nlohmann::json& info,
                             uint64_t* begin, uint64_t* end) {
  const std::string where = fmt::format("{}: tensor '{}'", path, name);
  DIFFMOE_CHECK(info.is_object(), "{}: entry must be an object with dtype, shape, data_offsets, got {}", where,
                info.type_name());
  for (const char* field : {"dtype", "shape", "data_offsets"})
    DIFFMOE_CHECK(info.contains(field), "{}: missing field '{}'", where, field);

  SafetensorsEntry e;
  e.name = name;
  const auto& dtype = info["dtype"];
  DIFFMOE_CHECK(dtype.is_string(), "{}: dtype must be a string, got {}", where, dtype.dump());
  e.dtype = safetensors_dtype_from_name(dtype.get<std::string>(), where);

  const auto& shape = info["shape"];
  DIFFMOE_CHECK(shape.is_array(), "{}: shape must be an array, got {}", where, shape.dump());
  for (const auto& d : shape) {
    const auto dim = as_non_negative_int(d);
    DIFFMOE_CHECK(dim && *dim <= static_cast<uint64_t>(INT64_MAX), "{}: shape {} must hold non-negative integers",
                  where, shape.dump());
    e.shape.push_back(static_cast<int64_t>(*dim));
  }

  const auto& offsets = info["data_offsets"];
  std::optional<uint64_t> b, en;
  if (offsets.is_array() && offsets.size() == 2) {
    b = as_non_negative_int(offsets[0]);
    en = as_non_negative_int(offsets[1]);
  }
  DIFFMOE_CHECK(b && en && *b <= *en, "{}: data_offsets must be [begin, end] with 0 <= begin <= end, got {}", where,
                offsets.dump());
  *begin = *b;
  *end = *en;

  // end - begin == numel * itemsize (docs/formats.md §1b); all our dtypes are whole bytes.
  const auto numel = checked_numel(e.shape);
  uint64_t need = 0;
  const bool fits = numel && !__builtin_mul_overflow(static_cast<uint64_t>(*numel), dtype_size(e.dtype), &need);
  DIFFMOE_CHECK(fits, "{}: shape {} is too large", where, shape_str(e.shape));
  DIFFMOE_CHECK(*en - *b == need, "{}: data_offsets [{}, {}] hold {} bytes, shape {} of {} needs {}", where, *b, *en,
                *en - *b, shape_str(e.shape), dtype.get<std::string>(), need);
  e.nbytes = static_cast<size_t>(need);
  return e;
}

// Converts `n` elements from a source dtype into float/double, reading unaligned bytes via memcpy
// (a file written by someone else may not be 8-aligned).
template <class Dst>
bool convert_floats(DType src_type, const unsigned char* src, Dst* dst, size_t n) {
  switch (src_type) {
    case DType::kF32:
      for (size_t i = 0; i < n; ++i) {
        float v;
        std::memcpy(&v, src + 4 * i, 4);
        dst[i] = static_cast<Dst>(v);
      }
      return true;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) {
        double v;
        std::memcpy(&v, src + 8 * i, 8);
        dst[i] = static_cast<Dst>(v);
      }
      return true;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, 2);
        dst[i] = static_cast<Dst>(bf16_to_f32(v));
      }
      return true;
    case DType::kF8E4M3:
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<Dst>(e4m3_to_f32(src[i]));
      return true;
    default: return false;
  }
}

}  // namespace

std::string safetensors_dtype_name(DType t) {
  for (const auto& [type, name] : kDTypeNames)
    if (type == t) return name;
  DIFFMOE_FAIL("[safetensors] dtype {} has no safetensors name", dtype_name(t));
}

DType safetensors_dtype_from_name(const std::string& s, const std::string& context) {
  for (const auto& [type, name] : kDTypeNames)
    if (s == name) return type;
  DIFFMOE_FAIL("{}: unsupported dtype '{}' (supported: {})", context, s, supported_dtype_list());
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;  // owns the mapping from the moment it exists, so every error path unmaps
  f.path_ = path;

  // O_NONBLOCK: a FIFO named as a model file must be refused below, not block the open forever
  // (it changes nothing for the mapping of a regular file).
  io::FdGuard fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)};
  DIFFMOE_CHECK(fd.fd >= 0, "{}: cannot open ({})", path, std::strerror(errno));
  struct stat st {};
  DIFFMOE_CHECK(::fstat(fd.fd, &st) == 0, "{}: cannot stat ({})", path, std::strerror(errno));
  DIFFMOE_CHECK(S_ISREG(st.st_mode), "{}: is {}, not a regular file", path, io::file_type_name(st.st_mode));
  const auto file_size = static_cast<uint64_t>(st.st_size);
  DIFFMOE_CHECK(file_size >= kSizeFieldBytes, "{}: file is {} bytes, too short for the 8-byte header size", path,
                file_size);

  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd.fd, 0);
  DIFFMOE_CHECK(map != MAP_FAILED, "{}: mmap of {} bytes failed ({})", path, file_size, std::strerror(errno));
  f.map_ = map;
  f.map_size_ = file_size;
  const auto* bytes = static_cast<const unsigned char*>(map);

  // u64 little-endian header size N; N <= MAX_HEADER_SIZE and 8 + N <= file size.
  uint64_t n = 0;
  std::memcpy(&n, bytes, sizeof n);
  DIFFMOE_CHECK(n <= kMaxHeaderSize, "{}: header size {} exceeds the maximum {}", path, n, kMaxHeaderSize);
  DIFFMOE_CHECK(kSizeFieldBytes + n <= file_size,
                "{}: header size {} exceeds the file ({} bytes after the 8-byte size field; truncated?)", path, n,
                file_size - kSizeFieldBytes);
  const std::string_view header_text(reinterpret_cast<const char*>(bytes + kSizeFieldBytes), n);
  DIFFMOE_CHECK(!header_text.empty() && header_text.front() == '{', "{}: header does not start with '{{'", path);

  // Trailing space padding is plain JSON whitespace, so the parser accepts it as is.
  const nlohmann::json header = parse_header_json(header_text, path);
  DIFFMOE_CHECK(header.is_object(), "{}: header must be a JSON object", path);

  struct Placed {
    uint64_t begin, end;
    size_t entry;
  };
  std::vector<Placed> placed;
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      // "__metadata__" is a string->string map; other JSON values are not allowed (docs/formats.md §1b).
      // null is read as "no metadata", as the reference's Option<HashMap<String, String>> does.
      if (value.is_null()) continue;
      DIFFMOE_CHECK(value.is_object(), "{}: __metadata__ must be an object of strings, got {}", path,
                    value.type_name());
      for (const auto& [mk, mv] : value.items()) {
        DIFFMOE_CHECK(mv.is_string(), "{}: __metadata__ value of '{}' must be a string, got {} {}", path, mk,
                      mv.type_name(), mv.dump());
        f.metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    Placed p{};
    f.entries_.push_back(parse_entry(path, key, value, &p.begin, &p.end));
    p.entry = f.entries_.size() - 1;
    placed.push_back(p);
  }

  // The byte buffer must be entirely indexed: sorted by offsets, contiguous from 0.
  std::sort(placed.begin(), placed.end(), [&](const Placed& a, const Placed& b) {
    return std::tie(a.begin, a.end, f.entries_[a.entry].name) < std::tie(b.begin, b.end, f.entries_[b.entry].name);
  });
  uint64_t expected = 0;
  const std::string* previous = nullptr;
  for (const auto& p : placed) {
    const std::string& name = f.entries_[p.entry].name;
    DIFFMOE_CHECK(p.begin >= expected, "{}: tensor '{}': data_offsets [{}, {}] overlap tensor '{}' ending at {}", path,
                  name, p.begin, p.end, previous ? *previous : std::string(), expected);
    DIFFMOE_CHECK(p.begin == expected, "{}: tensor '{}': data_offsets [{}, {}] leave a hole of {} bytes at offset {}",
                  path, name, p.begin, p.end, p.begin - expected, expected);
    expected = p.end;
    previous = &name;
  }
  const uint64_t buffer_size = file_size - kSizeFieldBytes - n;
  DIFFMOE_CHECK(expected <= buffer_size,
                "{}: data_offsets end at {} but the data buffer holds {} bytes (file truncated?)", path, expected,
                buffer_size);
  DIFFMOE_CHECK(expected == buffer_size, "{}: {} trailing bytes after the last tensor (data_offsets end at {})", path,
                buffer_size - expected, expected);

  const unsigned char* buffer = bytes + kSizeFieldBytes + n;
  for (const auto& p : placed) f.entries_[p.entry].data = buffer + p.begin;
  for (size_t i = 0; i < f.entries_.size(); ++i) f.index_[f.entries_[i].name] = i;
  return f;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept
    : path_(std::move(o.path_)),
      metadata_(std::move(o.metadata_)),
      entries_(std::move(o.entries_)),
      index_(std::move(o.index_)),
      map_(std::exchange(o.map_, nullptr)),
      map_size_(std::exchange(o.map_size_, 0)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    if (map_) ::munmap(map_, map_size_);
    path_ = std::move(o.path_);
    metadata_ = std::move(o.metadata_);
    entries_ = std::move(o.entries_);
    index_ = std::move(o.index_);
    map_ = std::exchange(o.map_, nullptr);
    map_size_ = std::exchange(o.map_size_, 0);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

const SafetensorsEntry& SafetensorsFile::get(const std::string& name) const {
  const auto it = index_.find(name);
  DIFFMOE_CHECK(it != index_.end(), "{}: no tensor '{}' ({} tensors in the file)", path_, name, entries_.size());
  return entries_[it->second];
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& [name, i] : index_) out.push_back(name);  // std::map: already sorted
  return out;
}

void SafetensorsFile::read_into(const std::string& name, const Tensor& dst) const {
  const SafetensorsEntry& e = get(name);
  const std::string where = fmt::format("{}: tensor '{}'", path_, name);
  DIFFMOE_CHECK(dst.device == Device::kCPU, "{}: read_into needs a host tensor, got {}", where, dst.describe());

  bool same_shape = static_cast<int>(e.shape.size()) == dst.rank();
  for (int i = 0; same_shape && i < dst.rank(); ++i) same_shape = e.shape[i] == dst.dim(i);
  DIFFMOE_CHECK(same_shape, "{}: shape {} in the file, destination expects {}", where, shape_str(e.shape),
                shape_str(dst.shape));
  const size_t n = static_cast<size_t>(dst.numel());
  if (n == 0) return;
  DIFFMOE_CHECK(dst.data != nullptr, "{}: destination has no memory", where);

  const auto* src = static_cast<const unsigned char*>(e.data);
  if (e.dtype == dst.dtype) {
    std::memcpy(dst.data, src, e.nbytes);
    return;
  }
  bool converted = false;
  if (dst.dtype == DType::kF32) converted = convert_floats(e.dtype, src, static_cast<float*>(dst.data), n);
  if (dst.dtype == DType::kF64) converted = convert_floats(e.dtype, src, static_cast<double*>(dst.data), n);
  DIFFMOE_CHECK(converted, "{}: cannot convert {} in the file into a {} destination", where,
                safetensors_dtype_name(e.dtype), dtype_name(dst.dtype));
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data) {
  DIFFMOE_CHECK(name != kMetadataKey, "[safetensors] tensor name '{}' is reserved", name);
  for (const auto& it : items_) DIFFMOE_CHECK(it.name != name, "[safetensors] duplicate tensor name '{}'", name);
  for (int64_t d : shape)
    DIFFMOE_CHECK(d >= 0, "[safetensors] tensor '{}': negative dimension in shape {}", name, shape_str(shape));
  const auto numel = checked_numel(shape);
  DIFFMOE_CHECK(numel, "[safetensors] tensor '{}': shape {} is too large", name, shape_str(shape));
  DIFFMOE_CHECK(data != nullptr || *numel == 0, "[safetensors] tensor '{}': null data for shape {}", name,
                shape_str(shape));
  safetensors_dtype_name(dtype);  // throws early for a dtype the format cannot name
  items_.push_back(Item{name, dtype, std::move(shape), data});
}

void SafetensorsWriter::add(const std::string& name, const Tensor& host_tensor) {
  DIFFMOE_CHECK(host_tensor.device == Device::kCPU,
                "[safetensors] tensor '{}': only host tensors can be written, got {}", name, host_tensor.describe());
  std::vector<int64_t> shape;
  for (int i = 0; i < host_tensor.rank(); ++i) shape.push_back(host_tensor.dim(i));
  add(name, host_tensor.dtype, std::move(shape), host_tensor.data);
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  // transformers rejects files whose "format" is not a framework name (docs/formats.md §1b); we write "pt".
  DIFFMOE_CHECK(key != "format" || value == "pt", "[safetensors] metadata 'format' must be \"pt\", got \"{}\"", value);
  metadata_[key] = value;
}

void SafetensorsWriter::write(const std::string& path) const {
  // Layout: dtype size descending, then name (docs/formats.md §1b), so every tensor is naturally aligned.
  std::vector<const Item*> order;
  for (const auto& it : items_) order.push_back(&it);
  std::sort(order.begin(), order.end(), [](const Item* a, const Item* b) {
    const size_t sa = dtype_size(a->dtype), sb = dtype_size(b->dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });

  // Header: "__metadata__" first, then tensors in buffer order, compact JSON.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  auto& meta = header[kMetadataKey] = nlohmann::ordered_json::object();
  std::map<std::string, std::string> metadata = metadata_;
  metadata["format"] = "pt";
  for (const auto& [k, v] : metadata) meta[k] = v;
  uint64_t offset = 0;
  for (const Item* it : order) {
    const uint64_t nbytes = static_cast<uint64_t>(*checked_numel(it->shape)) * dtype_size(it->dtype);
    header[it->name] = {{"dtype", safetensors_dtype_name(it->dtype)},
                        {"shape", it->shape},
                        {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // e.g. a name that is not valid UTF-8
    DIFFMOE_FAIL("{}: cannot encode the header: {}", path, e.what());
  }
  // Pad with spaces so that 8 + N, the start of the data, is a multiple of 8.
  text.append((kHeaderAlignment - (kSizeFieldBytes + text.size()) % kHeaderAlignment) % kHeaderAlignment, ' ');
  const uint64_t n = text.size();

  // Atomic write: temp file in the same directory, fsync, rename, fsync the directory. The rename
  // would replace whatever `path` is, so a device node or FIFO there is refused first.
  io::check_output_path(path, "safetensors file");
  const io::Failure failed = io::replace_file(path, [&](int fd) {
    if (!io::write_all(fd, &n, sizeof n) || !io::write_all(fd, text.data(), text.size())) return false;
    for (const Item* it : order) {
      const size_t nbytes = static_cast<size_t>(*checked_numel(it->shape)) * dtype_size(it->dtype);
      if (!io::write_all(fd, it->data, nbytes)) return false;
    }
    return true;
  });
  DIFFMOE_CHECK(failed.step != io::kStepCreate, "{}: cannot create temporary file '{}' ({})", path, io::temp_path(path),
                std::strerror(failed.err));
  DIFFMOE_CHECK(!failed, "{}: {} failed ({}); the file was not replaced", path, failed.step, std::strerror(failed.err));

  // Make the rename durable: fsync the directory entry.
  const io::Failure dir_failed = io::fsync_parent_directory(path);
  DIFFMOE_CHECK(!dir_failed, "{}: written, but fsync of directory '{}' failed ({})", path, io::parent_directory(path),
                std::strerror(dir_failed.err));
}

}  // namespace diffmoe
