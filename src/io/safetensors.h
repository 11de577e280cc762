// safetensors reading and writing (docs/formats.md §1b): u64 header size, JSON header, byte buffer.
// Files we write load in Python's safetensors/torch; files we read are validated like the
// reference reader, and every error names the file and the offending field.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace diffmoe {

// "F32", "F64", "BF16", "F8_E4M3", "I32", "I64", "U8"  <->  DType
std::string safetensors_dtype_name(DType t);
DType safetensors_dtype_from_name(const std::string& s, const std::string& context);

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // into the mapped file
  size_t nbytes = 0;
};

// A validated, memory-mapped safetensors file (read-only).
class SafetensorsFile {
 public:
  // Throws diffmoe::Error("<path>: <what is wrong>") for a missing, truncated or inconsistent file:
  // header size beyond the file or > 100 MB, bad JSON, unknown dtype, offsets out of range,
  // overlapping or non-contiguous data, size != numel·itemsize, trailing bytes.
  static SafetensorsFile open(const std::string& path);
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const { return index_.contains(name); }
  const SafetensorsEntry& get(const std::string& name) const;  // error names file + tensor
  std::vector<std::string> names() const;                      // sorted
  // Copies a tensor into `dst` (host memory), converting F32/F64/BF16 into dst's float dtype;
  // the shape must equal dst's shape. Errors name file, tensor, expected and found shape.
  void read_into(const std::string& name, const Tensor& dst) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
};

// Writes a safetensors file atomically: <path>.tmp, fsync, rename, fsync of the directory.
// Tensors are laid out by dtype size descending, then name (docs/formats.md §1b); the header is padded
// with spaces to a multiple of 8; metadata always gets "format": "pt".
class SafetensorsWriter {
 public:
  // Copies nothing: `data` must stay valid until write(). Duplicate names are an error.
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data);
  void add(const std::string& name, const Tensor& host_tensor);
  void set_metadata(const std::string& key, const std::string& value);
  void write(const std::string& path) const;  // errors (e.g. disk full) name the path; no partial file remains

 private:
  struct Item {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    const void* data;
  };
  std::vector<Item> items_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace diffmoe
