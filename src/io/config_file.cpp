// SCAFFOLD: replaced by the real implementation.
#include "io/config_file.h"
#include "core/error.h"
namespace diffmoe {
nlohmann::ordered_json parse_yaml(std::string_view, std::string_view s) { DIFFMOE_FAIL("[yaml] not implemented: {}", s); }
nlohmann::ordered_json load_yaml_file(const std::string& p) { DIFFMOE_FAIL("[yaml] not implemented: {}", p); }
std::string to_yaml(const nlohmann::ordered_json&) { DIFFMOE_FAIL("[yaml] not implemented"); }
void apply_override(nlohmann::ordered_json&, std::string_view, bool) { DIFFMOE_FAIL("[yaml] not implemented"); }
}  // namespace diffmoe
