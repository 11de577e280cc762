// YAML config files, read into JSON values so that one representation serves configs, command-line
// overrides, checkpoint metadata (safetensors "config") and run logs.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <string_view>

namespace diffmoe {

// Parses YAML text: mappings -> objects (key order kept), sequences -> arrays, plain scalars typed
// as YAML 1.2 core schema (int, float incl. .inf/.nan and 1e-3, bool true/false, null ~), quoted
// scalars always strings. Errors throw diffmoe::Error naming `source` and the line/column.
nlohmann::ordered_json parse_yaml(std::string_view text, std::string_view source);
// Reads and parses a file; a missing/unreadable file is an error naming the path.
nlohmann::ordered_json load_yaml_file(const std::string& path);
// Renders JSON as YAML that parse_yaml reads back to the same value (for saving a run's config).
std::string to_yaml(const nlohmann::ordered_json& value);

// Applies one "a.b.c=value" override (value parsed as a YAML scalar/flow value) to `config`.
// The path must already exist unless `allow_new`; errors name the key.
void apply_override(nlohmann::ordered_json& config, std::string_view assignment, bool allow_new = false);

}  // namespace diffmoe
