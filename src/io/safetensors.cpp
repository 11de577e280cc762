// SCAFFOLD: replaced by the real implementation.
#include "io/safetensors.h"
namespace diffmoe {
SafetensorsFile SafetensorsFile::open(const std::string& p) { DIFFMOE_FAIL("[safetensors] not implemented: {}", p); }
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;
const SafetensorsEntry& SafetensorsFile::get(const std::string& n) const { DIFFMOE_FAIL("[safetensors] not implemented: {}", n); }
std::vector<std::string> SafetensorsFile::names() const { return {}; }
void SafetensorsFile::read_into(const std::string& n, const Tensor&) const { DIFFMOE_FAIL("[safetensors] not implemented: {}", n); }
void SafetensorsWriter::add(const std::string& n, DType, std::vector<int64_t>, const void*) { DIFFMOE_FAIL("[safetensors] not implemented: {}", n); }
void SafetensorsWriter::add(const std::string& n, const Tensor&) { DIFFMOE_FAIL("[safetensors] not implemented: {}", n); }
void SafetensorsWriter::set_metadata(const std::string&, const std::string&) {}
void SafetensorsWriter::write(const std::string& p) const { DIFFMOE_FAIL("[safetensors] not implemented: {}", p); }
}  // namespace diffmoe
