// YAML config tests: scalar typing (YAML 1.2 core schema), structure and key order, errors with
// source:line:column, to_yaml round trips of tricky values, and command-line overrides.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/config_file.h"
#include "io_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using Json = nlohmann::ordered_json;

using test::error_of;

// Past the range of a double: too large is ±inf (the usual YAML reading), too small is ±0 (or the
// subnormal it rounds to), never inf.
TEST(Yaml, FloatsOutOfRange) {
  const Json j = parse_yaml(
      "big: 1e999\n"
      "nbig: -12.5e99999999999999999999\n"
      "tiny: 1e-400\n"
      "ntiny: -0.0001e-320\n"
      "huge_negative_exponent: 5e-99999999999999999999\n"
      "many_digits: 123456789e-410\n"
      "subnormal: 1e-310\n",
      "range.yaml");
  EXPECT_EQ(j["big"].get<double>(), HUGE_VAL);
  EXPECT_EQ(j["nbig"].get<double>(), -HUGE_VAL);
  EXPECT_EQ(j["tiny"].get<double>(), 0.0);
  EXPECT_EQ(j["ntiny"].get<double>(), 0.0);
  EXPECT_TRUE(std::signbit(j["ntiny"].get<double>()));
  EXPECT_EQ(j["huge_negative_exponent"].get<double>(), 0.0);
  EXPECT_EQ(j["many_digits"].get<double>(), 0.0);
  EXPECT_GT(j["subnormal"].get<double>(), 0.0);
  EXPECT_LT(j["subnormal"].get<double>(), 1.1e-310);
}

TEST(Yaml, ScalarTypes) {
  const Json j = parse_yaml(
      "int: 42\n"
      "neg: -7\n"
      "plus: +3\n"
      "hex: 0x1F\n"
      "float: 3.5\n"
      "small: 1e-3\n"
      "lr: 3.0e-4\n"
      "dot: .5\n"
      "inf: .inf\n"
      "ninf: -.inf\n"
      "nan: .nan\n"
      "t: true\n"
      "f: False\n"
      "n: null\n"
      "tilde: ~\n"
      "empty:\n"
      "quoted: \"123\"\n"
      "squoted: 'true'\n"
      "qnull: \"null\"\n"
      "str: hello world\n"
      "version: 1.2.3\n"
      "yes: yes\n"
      "block: |\n"
      "  42\n"
      "tagged: !!str 7\n"
      "tagged_float: !!float 2\n",
      "types.yaml");
  EXPECT_TRUE(j["int"].is_number_integer());
  EXPECT_EQ(j["int"].get<int64_t>(), 42);
  EXPECT_EQ(j["neg"].get<int64_t>(), -7);
  EXPECT_EQ(j["plus"].get<int64_t>(), 3);
  EXPECT_EQ(j["hex"].get<int64_t>(), 31);
  EXPECT_TRUE(j["float"].is_number_float());
  EXPECT_EQ(j["float"].get<double>(), 3.5);
  EXPECT_TRUE(j["small"].is_number_float());
  EXPECT_EQ(j["small"].get<double>(), 1e-3);
  EXPECT_TRUE(j["lr"].is_number_float());
  EXPECT_EQ(j["lr"].get<double>(), 3.0e-4);
  EXPECT_EQ(j["dot"].get<double>(), 0.5);
  EXPECT_EQ(j["inf"].get<double>(), HUGE_VAL);
  EXPECT_EQ(j["ninf"].get<double>(), -HUGE_VAL);
  EXPECT_TRUE(std::isnan(j["nan"].get<double>()));
  EXPECT_EQ(j["t"], true);
  EXPECT_EQ(j["f"], false);
  EXPECT_TRUE(j["n"].is_null());
  EXPECT_TRUE(j["tilde"].is_null());
  EXPECT_TRUE(j["empty"].is_null());
  EXPECT_EQ(j["quoted"], "123");
  EXPECT_EQ(j["squoted"], "true");
  EXPECT_EQ(j["qnull"], "null");
  EXPECT_EQ(j["str"], "hello world");
  EXPECT_EQ(j["version"], "1.2.3");
  EXPECT_EQ(j["yes"], "yes");  // YAML 1.2: only true/false are booleans
  EXPECT_EQ(j["block"], "42\n");
  EXPECT_EQ(j["tagged"], "7");
  EXPECT_TRUE(j["tagged_float"].is_number_float());
}

TEST(Yaml, NestedMapsListsAndKeyOrder) {
  const Json j = parse_yaml(
      "zeta: 1\n"
      "alpha:\n"
      "  mid: [1, 2.5, x]\n"
      "  after: {b: 1, a: 2}\n"
      "layers:\n"
      "  - name: attn\n"
      "    heads: 4\n"
      "  - name: moe\n"
      "    experts: [8, 2]\n"
      "middle: m\n",
      "nested.yaml");
  std::vector<std::string> keys;
  for (const auto& [k, v] : j.items()) keys.push_back(k);
  EXPECT_EQ(keys, (std::vector<std::string>{"zeta", "alpha", "layers", "middle"}));
  EXPECT_EQ(j["alpha"]["mid"], Json::parse(R"([1, 2.5, "x"])"));
  EXPECT_EQ(j["alpha"]["after"].dump(), R"({"b":1,"a":2})");  // flow mappings keep order too
  ASSERT_TRUE(j["layers"].is_array());
  EXPECT_EQ(j["layers"][0]["name"], "attn");
  EXPECT_EQ(j["layers"][0]["heads"], 4);
  EXPECT_EQ(j["layers"][1]["experts"], Json::parse("[8, 2]"));
  EXPECT_TRUE(parse_yaml("", "empty.yaml").is_null());
}

TEST(Yaml, DuplicateKeyIsAnErrorWithItsLine) {
  const std::string msg = error_of([] { parse_yaml("a: 1\nb:\n  c: 2\n  c: 3\n", "dup.yaml"); });
  EXPECT_EQ(msg.rfind("dup.yaml:4:3: duplicate key 'c' (first defined at line 3)", 0), 0u) << msg;
}

TEST(Yaml, SyntaxErrorNamesSourceAndLine) {
  const std::string msg = error_of([] { parse_yaml("a: 1\nb: [1, 2\nc: 3\n", "bad.yaml"); });
  EXPECT_EQ(msg.rfind("bad.yaml:3:", 0), 0u) << msg;
  const std::string msg2 = error_of([] { parse_yaml("a: 1\n  b: 2\n", "indent.yaml"); });
  EXPECT_EQ(msg2.rfind("indent.yaml:2:", 0), 0u) << msg2;
}

TEST(Yaml, IntegerOutOfRangeIsAnError) {
  const std::string msg = error_of([] { parse_yaml("x: 1\ny: 99999999999999999999\n", "big.yaml"); });
  EXPECT_EQ(msg.rfind("big.yaml:2:4: integer '99999999999999999999' does not fit", 0), 0u) << msg;
}

// yaml-cpp shares aliased nodes: an alias inside its own anchor is a cycle, fanned-out aliases
// expand exponentially. Both must fail with a location instead of crashing or eating memory.
TEST(Yaml, RecursiveAliasOrAliasBombIsAnError) {
  const std::string cycle = error_of([] { parse_yaml("model: &a\n  x: *a\n", "cycle.yaml"); });
  EXPECT_EQ(cycle.rfind("cycle.yaml:", 0), 0u) << cycle;
  EXPECT_NE(cycle.find(": nesting too deep or a recursive alias"), std::string::npos) << cycle;

  // 10^7 leaves from 8 lines (finite, so without the node limit this would succeed slowly).
  std::string bomb = "l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n";
  for (int i = 1; i <= 6; ++i) {
    bomb += fmt::format("l{}: &l{} [", i, i);
    for (int k = 0; k < 10; ++k) bomb += fmt::format("{}*l{}", k ? ", " : "", i - 1);
    bomb += "]\n";
  }
  const std::string laughs = error_of([&] { parse_yaml(bomb, "laughs.yaml"); });
  EXPECT_EQ(laughs.rfind("laughs.yaml:", 0), 0u) << laughs;
  EXPECT_NE(laughs.find(": nesting too deep or a recursive alias"), std::string::npos) << laughs;
}

TEST(Yaml, NestingDepthLimitIs64) {
  auto nested = [](int depth) { return "x: " + std::string(depth, '[') + "1" + std::string(depth, ']') + "\n"; };
  const Json ok = parse_yaml(nested(63), "deep.yaml");  // the mapping is depth 0, the scalar depth 64
  EXPECT_TRUE(ok["x"].is_array());
  const std::string msg = error_of([&] { parse_yaml(nested(64), "deep.yaml"); });
  EXPECT_EQ(msg.rfind("deep.yaml:1:", 0), 0u) << msg;
  EXPECT_NE(msg.find("nesting too deep or a recursive alias"), std::string::npos) << msg;
}

// Found by fuzzing (tests/fuzz/corpus/yaml_config/regression-*): yaml-cpp's LoadAll never returned
// on a document starting with ',' (memory grew without bound), and bytes that are not UTF-8 made
// every later error message throw from nlohmann's dump() instead of naming the key.
TEST(Yaml, HostileTextFailsFastWithALocation) {
  for (const char* text : {",", ",a: 1\n", "# comment\n,\n", "---\n,\n", "a: 1\n---\nb: 2\n"}) {
    SCOPED_TRACE(text);
    const std::string err = error_of([&] { parse_yaml(text, "c.yaml"); });
    EXPECT_EQ(err.rfind("c.yaml: expected one YAML document", 0), 0u) << err;
  }
  const std::string bad_value = error_of([&] { parse_yaml("model:\n  dim: \"\xc8\x01\"\n", "c.yaml"); });
  EXPECT_EQ(bad_value.rfind("c.yaml:2:8: a scalar is not valid UTF-8", 0), 0u) << bad_value;
  const std::string bad_key = error_of([&] { parse_yaml("a: 1\n\xc8\x01: 1\n", "c.yaml"); });
  EXPECT_NE(bad_key.find("not valid UTF-8"), std::string::npos) << bad_key;
  // Valid multi-byte text (2, 3 and 4 bytes) stays as it is.
  EXPECT_EQ(parse_yaml("a: \"caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x99\x82\"\n", "c.yaml")["a"],
            "caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x99\x82");
}

TEST(Yaml, LoadFile) {
  const test::TempDir tmp("yaml");
  const std::filesystem::path& dir = tmp.path();
  const std::string p = (dir / "c.yaml").string();
  std::ofstream(p) << "model:\n  d_model: 64\n";
  EXPECT_EQ(load_yaml_file(p)["model"]["d_model"], 64);

  const std::string missing = (dir / "missing.yaml").string();
  EXPECT_EQ(error_of([&] {
              load_yaml_file(missing);
            }).rfind(missing + ": cannot open the config file (No such file or directory)", 0),
            0u);
  const std::string is_dir = error_of([&] { load_yaml_file(dir.string()); });
  EXPECT_EQ(is_dir.rfind(dir.string() + ": the config file is a directory, not a regular file", 0), 0u) << is_dir;
  // Endless files are refused before any byte is read (io::read_small_file).
  const std::string zero = error_of([&] { load_yaml_file("/dev/zero"); });
  EXPECT_EQ(zero.rfind("/dev/zero: the config file is a character device, not a regular file", 0), 0u) << zero;

  std::ofstream(p) << "a: 1\na: 2\n";
  EXPECT_EQ(error_of([&] { load_yaml_file(p); }).rfind(p + ":2:1: duplicate key 'a'", 0), 0u);
}

TEST(Yaml, ToYamlExactOutput) {
  const Json j = Json::parse(R"({"a":1,"b":{"c":"true","d":[1,{"e":2.0,"f":null}],"g":[]},"h":"x"})");
  EXPECT_EQ(to_yaml(j),
            "a: 1\n"
            "b:\n"
            "  c: \"true\"\n"
            "  d:\n"
            "    - 1\n"
            "    - e: 2.0\n"
            "      f: null\n"
            "  g: []\n"
            "h: x\n");
}

TEST(Yaml, ToYamlRoundTripsTrickyValues) {
  Json j = Json::object();
  j["strings"] = Json::array(
      {"true",  "1.5",  "",    "a: b",     "#x",         "null",        "~",         "0x10",        "1e5",
       ".inf",  "-",    "- x", " lead",    "trail ",     "multi\nline", "tab\there", "quote\"s",    "back\\slash",
       "x #y",  "key:", "[x]", "{y}",      "*ref",       "&anchor",     "!tag",      "%pct",        "@at",
       "`tick", "|",    ">",   "'single'", "...",        "... x",       "---",       "caf\xC3\xA9", "ctrl\x01",
       "True",  "NULL", "+1",  ".5",       "plain words"});
  j["doubles"] = Json::array({0.1, 1e-30, 3.0, -2.5, 1e300, 123456.789, 5e-324, -0.0, 1e16, 2.0 / 3.0});
  j["ints"] = Json::array({0, -1, 9007199254740993LL, std::numeric_limits<int64_t>::min()});
  j["nested"]["deeper"]["list_of_lists"] = Json::parse("[[1, 2], [], [[3]], {}]");
  j["nested"]["deeper"]["empty_map"] = Json::object();
  j["nested"]["list_of_maps"] = Json::parse(R"([{"a": 1, "b": [true, false]}, {"c": {"d": null}}])");
  j["odd keys"]["true"] = 1;
  j["odd keys"]["123"] = "s";
  j["odd keys"]["a: b"] = "t";
  j["odd keys"][""] = "empty key";
  j["bool"] = false;
  j["null"] = nullptr;

  const std::string text = to_yaml(j);
  const Json back = parse_yaml(text, "roundtrip.yaml");
  // dump() distinguishes 3 from 3.0 and keeps key order, so this checks types as well as values.
  EXPECT_EQ(back.dump(), j.dump()) << text;
  EXPECT_TRUE(back["doubles"][2].is_number_float()) << text;
  EXPECT_TRUE(std::signbit(back["doubles"][7].get<double>()));
  EXPECT_NE(text.find("- 0.1\n"), std::string::npos) << text;  // shortest form, not 0.10000000000000001

  // Non-finite doubles round-trip as .inf/.nan (JSON's dump would print null).
  const Json nonfinite = Json::array({HUGE_VAL, -HUGE_VAL, std::nan("")});
  const Json nf_back = parse_yaml(to_yaml(nonfinite), "nonfinite.yaml");
  EXPECT_EQ(nf_back[0].get<double>(), HUGE_VAL);
  EXPECT_EQ(nf_back[1].get<double>(), -HUGE_VAL);
  EXPECT_TRUE(std::isnan(nf_back[2].get<double>()));

  // Top-level scalars and empty containers.
  for (const Json& v :
       {Json("true"), Json("..."), Json("--- x"), Json(1.0), Json(7), Json(nullptr), Json::array(), Json::object()})
    EXPECT_EQ(parse_yaml(to_yaml(v), "scalar.yaml").dump(), v.dump()) << to_yaml(v);
}

// Keys longer than YAML's 1024-character limit on implicit keys (a fuzz finding: yaml-cpp rejected
// the text to_yaml wrote) go out in the explicit "? key" form: plain and quoted, with scalar,
// mapping and sequence values, at the top level, nested and as the first key of a sequence item.
TEST(Yaml, ToYamlRoundTripsKeysLongerThanTheImplicitKeyLimit) {
  const std::string plain(1500, 'k'), quoted = std::string(1100, 'q') + ": x", edge(1024, 'e');
  Json j = Json::object();
  j[plain] = 1;
  j[quoted]["inner"] = Json::array({1, 2});
  j["list"] = Json::array({Json::object({{plain, nullptr}, {"b", "c"}}), Json::object({{edge, true}})});
  j[edge] = "at the limit";
  const std::string text = to_yaml(j);
  EXPECT_EQ(parse_yaml(text, "longkeys.yaml").dump(), j.dump()) << text;
  EXPECT_NE(text.find("? " + plain + "\n"), std::string::npos);
  EXPECT_NE(text.find("\n" + edge + ": at the limit\n"), std::string::npos);  // 1024: still implicit
}

// ---- overrides ----

Json base_config() {
  return parse_yaml(
      "model:\n"
      "  d_model: 64\n"
      "  act: true\n"
      "  name: tiny\n"
      "  dims: [1]\n"
      "  moe:\n"
      "    experts: 8\n"
      "optim:\n"
      "  lr: 0.001\n",
      "base.yaml");
}

TEST(Override, ExistingKeysGetTypedValues) {
  Json c = base_config();
  apply_override(c, "model.d_model=128");
  EXPECT_TRUE(c["model"]["d_model"].is_number_integer());
  EXPECT_EQ(c["model"]["d_model"], 128);
  apply_override(c, "optim.lr=3e-4");
  EXPECT_TRUE(c["optim"]["lr"].is_number_float());
  EXPECT_EQ(c["optim"]["lr"].get<double>(), 3e-4);
  apply_override(c, "optim.lr=1");  // an integer on a float key stays a float
  EXPECT_TRUE(c["optim"]["lr"].is_number_float());
  EXPECT_EQ(c["optim"]["lr"].get<double>(), 1.0);
  apply_override(c, "model.act=false");
  EXPECT_EQ(c["model"]["act"], false);
  apply_override(c, "model.dims=[1,2]");
  EXPECT_EQ(c["model"]["dims"], Json::parse("[1, 2]"));
  apply_override(c, "model.name=\"5\"");
  EXPECT_EQ(c["model"]["name"], "5");
  apply_override(c, "model.name=a=b");  // split at the first '='
  EXPECT_EQ(c["model"]["name"], "a=b");
  apply_override(c, "model.moe.experts=16");
  EXPECT_EQ(c["model"]["moe"]["experts"], 16);
  apply_override(c, "model.moe={experts: 4, top_k: 2}");  // a whole section
  EXPECT_EQ(c["model"]["moe"].dump(), R"({"experts":4,"top_k":2})");
  // Key order is unchanged by overrides.
  EXPECT_EQ(c.begin().key(), "model");
}

TEST(Override, UnknownKeyNamesTheFullPath) {
  Json c = base_config();
  const Json before = c;
  std::string msg = error_of([&] { apply_override(c, "model.moe.expert=4"); });
  EXPECT_EQ(msg.rfind("unknown config key 'model.moe.expert'", 0), 0u) << msg;
  msg = error_of([&] { apply_override(c, "model.mo.experts=4"); });
  EXPECT_EQ(msg.rfind("unknown config key 'model.mo.experts'", 0), 0u) << msg;
  msg = error_of([&] { apply_override(c, "model.d_model.x=4"); });
  EXPECT_NE(msg.find("config key 'model.d_model' is a number, not a section"), std::string::npos) << msg;
  EXPECT_THROW(apply_override(c, "model.d_model"), Error);     // no '='
  EXPECT_THROW(apply_override(c, "model..d_model=1"), Error);  // empty component
  EXPECT_THROW(apply_override(c, "model.dims=[1,"), Error);    // bad YAML value
  EXPECT_EQ(c, before);
}

TEST(Override, AllowNewCreatesKeysAndSections) {
  Json c = base_config();
  apply_override(c, "model.moe.top_k=2", true);
  EXPECT_EQ(c["model"]["moe"]["top_k"], 2);
  apply_override(c, "train.schedule.warmup=100", true);
  EXPECT_EQ(c["train"]["schedule"]["warmup"], 100);
  Json empty;
  apply_override(empty, "a.b=x", true);
  EXPECT_EQ(empty.dump(), R"({"a":{"b":"x"}})");
}

}  // namespace
}  // namespace diffmoe
