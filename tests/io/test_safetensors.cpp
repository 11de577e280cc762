// safetensors reader/writer tests (docs/formats.md §1b): golden byte layout, round trips, every
// validation rule of the reader with the file name and field in the message, atomic writes.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "io_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<unsigned char>;
using test::error_of;

class SafetensorsTest : public ::testing::Test {
 protected:
  std::string path(const std::string& name) const { return (dir_.path() / name).string(); }

  // Any leftover "<name>.tmp.<pid>" file in the test directory.
  bool has_temp_files() const {
    for (const auto& e : fs::directory_iterator(dir_.path()))
      if (e.path().filename().string().find(".tmp.") != std::string::npos) return true;
    return false;
  }

  test::TempDir dir_{"st"};  // a fresh directory per test
};

Bytes read_bytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& p, const Bytes& b) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

void put_u64(Bytes& b, uint64_t v) {
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<unsigned char>(v >> (8 * i)));
}

// A hand-made file: u64 LE header size, header text (padded with spaces to `pad_to` bytes if
// larger), then `data`. `size_field` overrides the header size written in the first 8 bytes.
Bytes make_file(const std::string& header, const Bytes& data, size_t pad_to = 0, int64_t size_field = -1) {
  std::string h = header;
  if (h.size() < pad_to) h.append(pad_to - h.size(), ' ');
  Bytes b;
  put_u64(b, size_field >= 0 ? static_cast<uint64_t>(size_field) : h.size());
  b.insert(b.end(), h.begin(), h.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

// ---- golden file (docs/formats.md §1b's interop example) ----

TEST_F(SafetensorsTest, GoldenLayoutHeaderAndData) {
  const float f32[6] = {1.0f, -2.0f, 0.5f, 3.25f, 100.0f, -0.125f};
  const uint16_t bf16[4] = {0x3F80, 0xC000, 0x4049, 0x3E80};  // 1.0, -2.0, 3.140625, 0.25
  const uint8_t f8[4] = {0x38, 0x40, 0xB8, 0x00};             // 1.0, 2.0, -1.0, 0.0 in E4M3
  SafetensorsWriter w;
  // Names chosen so that alphabetical order is the reverse of the required dtype-size order.
  w.add("a_f8", DType::kF8E4M3, {2, 2}, f8);
  w.add("b_bf16", DType::kBF16, {4}, bf16);
  w.add("c_f32", DType::kF32, {2, 3}, f32);
  w.set_metadata("step", "42");
  const std::string p = path("model.safetensors");
  w.write(p);

  const Bytes b = read_bytes(p);
  const std::string expected_header = R"({"__metadata__":{"format":"pt","step":"42"},)"
                                      R"("c_f32":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                                      R"("b_bf16":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},)"
                                      R"("a_f8":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[32,36]}})";
  ASSERT_EQ(expected_header.size(), 229u);
  // 229 bytes of JSON padded with 3 spaces: N = 232, so the data starts at 240 = 30·8.
  const Bytes size_field = {232, 0, 0, 0, 0, 0, 0, 0};
  ASSERT_EQ(b.size(), 8u + 232u + 36u);
  EXPECT_EQ(Bytes(b.begin(), b.begin() + 8), size_field);
  EXPECT_EQ(std::string(b.begin() + 8, b.begin() + 240), expected_header + "   ");
  // Data: F32 first (little-endian 1.0f = 00 00 80 3F, -2.0f = 00 00 00 C0), then BF16, then F8.
  const Bytes first_floats = {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0};
  EXPECT_EQ(Bytes(b.begin() + 240, b.begin() + 248), first_floats);
  EXPECT_EQ(std::memcmp(b.data() + 240, f32, 24), 0);
  const Bytes bf16_bytes = {0x80, 0x3F, 0x00, 0xC0, 0x49, 0x40, 0x80, 0x3E};
  EXPECT_EQ(Bytes(b.begin() + 264, b.begin() + 272), bf16_bytes);
  const Bytes f8_bytes = {0x38, 0x40, 0xB8, 0x00};
  EXPECT_EQ(Bytes(b.begin() + 272, b.end()), f8_bytes);

  // Read back: dtypes, shapes, metadata and values (BF16 and F8 converted to f32).
  const SafetensorsFile f = SafetensorsFile::open(p);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a_f8", "b_bf16", "c_f32"}));
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"step", "42"}}));
  EXPECT_EQ(f.get("c_f32").dtype, DType::kF32);
  EXPECT_EQ(f.get("b_bf16").dtype, DType::kBF16);
  EXPECT_EQ(f.get("a_f8").dtype, DType::kF8E4M3);
  EXPECT_EQ(f.get("c_f32").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f.get("a_f8").nbytes, 4u);

  float out6[6];
  f.read_into("c_f32", Tensor{out6, DType::kF32, Device::kCPU, Shape{2, 3}});
  for (int i = 0; i < 6; ++i) EXPECT_EQ(out6[i], f32[i]) << i;
  double out6d[6];
  f.read_into("c_f32", Tensor{out6d, DType::kF64, Device::kCPU, Shape{2, 3}});
  for (int i = 0; i < 6; ++i) EXPECT_EQ(out6d[i], static_cast<double>(f32[i])) << i;
  float out4[4];
  f.read_into("b_bf16", Tensor{out4, DType::kF32, Device::kCPU, Shape{4}});
  EXPECT_EQ(out4[0], 1.0f);
  EXPECT_EQ(out4[1], -2.0f);
  EXPECT_EQ(out4[2], 3.140625f);
  EXPECT_EQ(out4[3], 0.25f);
  f.read_into("a_f8", Tensor{out4, DType::kF32, Device::kCPU, Shape{2, 2}});
  EXPECT_EQ(out4[0], 1.0f);
  EXPECT_EQ(out4[1], 2.0f);
  EXPECT_EQ(out4[2], -1.0f);
  EXPECT_EQ(out4[3], 0.0f);
  uint8_t raw8[4] = {};
  f.read_into("a_f8", Tensor{raw8, DType::kF8E4M3, Device::kCPU, Shape{2, 2}});  // same dtype: bytes copied
  EXPECT_EQ(Bytes(raw8, raw8 + 4), f8_bytes);
}

TEST_F(SafetensorsTest, FormatPtAlwaysWrittenAndOtherFormatsRejected) {
  SafetensorsWriter w;
  const int32_t v = 7;
  w.add("x", DType::kI32, {}, &v);
  w.write(path("a.safetensors"));
  EXPECT_EQ(SafetensorsFile::open(path("a.safetensors")).metadata().at("format"), "pt");
  EXPECT_THROW(w.set_metadata("format", "np"), Error);
}

// ---- round trips ----

TEST_F(SafetensorsTest, IntegerAndF64RoundTrip) {
  const int32_t i32[5] = {0, -1, 2147483647, -2147483647 - 1, 12345};
  const double f64[4] = {0.1, -1e300, 5e-324, 3.0};
  const int64_t i64[2] = {-9007199254740993LL, 1LL << 62};
  const uint8_t u8[3] = {0, 128, 255};
  SafetensorsWriter w;
  w.add("i32", Tensor{const_cast<int32_t*>(i32), DType::kI32, Device::kCPU, Shape{5}});
  w.add("f64", DType::kF64, {2, 2}, f64);
  w.add("i64", DType::kI64, {2}, i64);
  w.add("u8", DType::kU8, {1, 3}, u8);
  w.write(path("r.safetensors"));

  const Bytes b = read_bytes(path("r.safetensors"));
  uint64_t n = 0;
  std::memcpy(&n, b.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);

  const auto f = SafetensorsFile::open(path("r.safetensors"));
  // 8-byte dtypes first (f64 before i64 by name), then i32, then u8: every tensor naturally aligned.
  const auto* base = static_cast<const unsigned char*>(f.get("f64").data);
  EXPECT_EQ(static_cast<const unsigned char*>(f.get("i64").data) - base, 32);
  EXPECT_EQ(static_cast<const unsigned char*>(f.get("i32").data) - base, 48);
  EXPECT_EQ(static_cast<const unsigned char*>(f.get("u8").data) - base, 68);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(base) % 8, 0u);

  int32_t i32_out[5];
  f.read_into("i32", Tensor{i32_out, DType::kI32, Device::kCPU, Shape{5}});
  for (int i = 0; i < 5; ++i) EXPECT_EQ(i32_out[i], i32[i]);
  double f64_out[4];
  f.read_into("f64", Tensor{f64_out, DType::kF64, Device::kCPU, Shape{2, 2}});
  for (int i = 0; i < 4; ++i) EXPECT_EQ(f64_out[i], f64[i]);  // bitwise: no conversion
  float f64_as_f32[4];
  f.read_into("f64", Tensor{f64_as_f32, DType::kF32, Device::kCPU, Shape{2, 2}});
  EXPECT_EQ(f64_as_f32[0], 0.1f);
  int64_t i64_out[2];
  f.read_into("i64", Tensor{i64_out, DType::kI64, Device::kCPU, Shape{2}});
  EXPECT_EQ(i64_out[0], i64[0]);
  EXPECT_EQ(i64_out[1], i64[1]);
  uint8_t u8_out[3];
  f.read_into("u8", Tensor{u8_out, DType::kU8, Device::kCPU, Shape{1, 3}});
  EXPECT_EQ(Bytes(u8_out, u8_out + 3), Bytes(u8, u8 + 3));

  // Integers are never converted to floats, or between widths.
  float i32_as_f32[5];
  EXPECT_NE(error_of([&] {
              f.read_into("i32", Tensor{i32_as_f32, DType::kF32, Device::kCPU, Shape{5}});
            }).find("cannot convert I32"),
            std::string::npos);
  int64_t i32_as_i64[5];
  EXPECT_THROW(f.read_into("i32", Tensor{i32_as_i64, DType::kI64, Device::kCPU, Shape{5}}), Error);
}

TEST_F(SafetensorsTest, RankZeroAndEmptyTensors) {
  const float scalar = 2.5f;
  SafetensorsWriter w;
  w.add("scalar", Tensor{const_cast<float*>(&scalar), DType::kF32, Device::kCPU, Shape{}});
  w.add("empty", Tensor{nullptr, DType::kF32, Device::kCPU, Shape{0, 4}});
  w.add("empty_i64", DType::kI64, {3, 0}, nullptr);
  w.write(path("z.safetensors"));

  const auto f = SafetensorsFile::open(path("z.safetensors"));
  EXPECT_TRUE(f.get("scalar").shape.empty());
  EXPECT_EQ(f.get("scalar").nbytes, 4u);
  EXPECT_EQ(f.get("empty").shape, (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(f.get("empty").nbytes, 0u);
  float out = 0;
  f.read_into("scalar", Tensor{&out, DType::kF32, Device::kCPU, Shape{}});
  EXPECT_EQ(out, 2.5f);
  f.read_into("empty", Tensor{nullptr, DType::kF32, Device::kCPU, Shape{0, 4}});
  // A rank-0 tensor is not a [1] tensor.
  EXPECT_THROW(f.read_into("scalar", Tensor{&out, DType::kF32, Device::kCPU, Shape{1}}), Error);
}

TEST_F(SafetensorsTest, FileWithOnlyEmptyTensorsAndNoData) {
  write_bytes(path("e.safetensors"), make_file(R"({"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})", {}));
  const auto f = SafetensorsFile::open(path("e.safetensors"));
  EXPECT_EQ(f.names(), std::vector<std::string>{"e"});
  EXPECT_TRUE(f.metadata().empty());
}

TEST_F(SafetensorsTest, HeaderPaddedWithTrailingSpacesIsAccepted) {
  const std::string header = R"({"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})";
  write_bytes(path("p.safetensors"), make_file(header, {7, 8, 9}, header.size() + 21));
  const auto f = SafetensorsFile::open(path("p.safetensors"));
  uint8_t out[3];
  f.read_into("x", Tensor{out, DType::kU8, Device::kCPU, Shape{3}});
  EXPECT_EQ(Bytes(out, out + 3), (Bytes{7, 8, 9}));
}

TEST_F(SafetensorsTest, MoveKeepsTheMappingValid) {
  const float v[2] = {1.5f, -4.0f};
  SafetensorsWriter w;
  w.add("v", DType::kF32, {2}, v);
  w.write(path("m.safetensors"));
  SafetensorsFile a = SafetensorsFile::open(path("m.safetensors"));
  SafetensorsFile b = std::move(a);
  SafetensorsFile c = SafetensorsFile::open(path("m.safetensors"));
  c = std::move(b);
  float out[2];
  c.read_into("v", Tensor{out, DType::kF32, Device::kCPU, Shape{2}});
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], -4.0f);
}

// ---- validation: each corruption names the file and the field ----

// A valid two-tensor file for the corruption tests: a F32[2] at [0,8], b F32[1] at [8,12].
const std::string kGoodHeader =
    R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})";
const Bytes kGoodData(12, 0x11);

TEST_F(SafetensorsTest, GoodCorruptionBaseOpens) {
  write_bytes(path("good.safetensors"), make_file(kGoodHeader, kGoodData));
  EXPECT_NO_THROW(SafetensorsFile::open(path("good.safetensors")));
}

TEST_F(SafetensorsTest, MissingFile) {
  const std::string p = path("missing.safetensors");
  const std::string msg = error_of([&] { SafetensorsFile::open(p); });
  EXPECT_EQ(msg.rfind(p, 0), 0u) << msg;  // the message starts with the path
  EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, TruncatedInTheSizeField) {
  write_bytes(path("t.safetensors"), Bytes{1, 2, 3});
  const std::string msg = error_of([&] { SafetensorsFile::open(path("t.safetensors")); });
  EXPECT_NE(msg.find("t.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("8-byte header size"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, TruncatedInTheHeader) {
  Bytes b = make_file(kGoodHeader, kGoodData);
  b.resize(8 + kGoodHeader.size() / 2);
  write_bytes(path("cut_header.safetensors"), b);
  const std::string msg = error_of([&] { SafetensorsFile::open(path("cut_header.safetensors")); });
  EXPECT_NE(msg.find("cut_header.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find(fmt::format("header size {} exceeds the file", kGoodHeader.size())), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, TruncatedInTheData) {
  Bytes b = make_file(kGoodHeader, kGoodData);
  b.resize(b.size() - 3);
  write_bytes(path("cut_data.safetensors"), b);
  const std::string msg = error_of([&] { SafetensorsFile::open(path("cut_data.safetensors")); });
  EXPECT_NE(msg.find("cut_data.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("data_offsets end at 12 but the data buffer holds 9 bytes"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, HeaderSizeBeyondTheFile) {
  write_bytes(path("big_n.safetensors"), make_file(kGoodHeader, kGoodData, 0, 5000));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("big_n.safetensors")); });
  EXPECT_NE(msg.find("big_n.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("header size 5000 exceeds the file"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, HeaderSizeAboveTheMaximum) {
  write_bytes(path("huge_n.safetensors"), make_file(kGoodHeader, kGoodData, 0, 100'000'001));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("huge_n.safetensors")); });
  EXPECT_NE(msg.find("huge_n.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("header size 100000001 exceeds the maximum 100000000"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, BadJson) {
  write_bytes(path("json.safetensors"), make_file(R"({"a":{"dtype":"F32",)", {}, 24));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("json.safetensors")); });
  EXPECT_NE(msg.find("json.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("header is not valid JSON"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, HeaderMustStartWithBrace) {
  write_bytes(path("brace.safetensors"), make_file("  " + kGoodHeader, kGoodData));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("brace.safetensors")); });
  EXPECT_NE(msg.find("brace.safetensors: header does not start with '{'"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, DuplicateKeys) {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  write_bytes(path("dup.safetensors"), make_file(header, Bytes(8, 0)));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("dup.safetensors")); });
  EXPECT_NE(msg.find("dup.safetensors: header has a duplicate key 'a'"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, UnknownDtypeListsTheSupportedOnes) {
  const std::string header = R"({"w.0":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})";
  write_bytes(path("dtype.safetensors"), make_file(header, Bytes(4, 0)));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("dtype.safetensors")); });
  EXPECT_NE(msg.find("dtype.safetensors: tensor 'w.0': unsupported dtype 'F16'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("F32, F64, BF16, F8_E4M3, I32, I64, U8"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, OffsetsWithAHole) {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})";
  write_bytes(path("hole.safetensors"), make_file(header, Bytes(12, 0)));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("hole.safetensors")); });
  EXPECT_NE(msg.find("hole.safetensors: tensor 'b': data_offsets [8, 12] leave a hole of 4 bytes at offset 4"),
            std::string::npos)
      << msg;
}

TEST_F(SafetensorsTest, BufferNotStartingAtZeroIsAHole) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  write_bytes(path("lead.safetensors"), make_file(header, Bytes(8, 0)));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("lead.safetensors")); });
  EXPECT_NE(msg.find("tensor 'a': data_offsets [4, 8] leave a hole"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, OverlappingOffsets) {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  write_bytes(path("overlap.safetensors"), make_file(header, Bytes(12, 0)));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("overlap.safetensors")); });
  EXPECT_NE(msg.find("overlap.safetensors: tensor 'b': data_offsets [4, 12] overlap tensor 'a'"), std::string::npos)
      << msg;
}

TEST_F(SafetensorsTest, SizeMismatchNamesOffsetsShapeAndDtype) {
  const std::string header = R"({"layers.0.attn.wo.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}})";
  write_bytes(path("model.safetensors"), make_file(header, Bytes(12, 0)));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("model.safetensors")); });
  EXPECT_EQ(msg.rfind(path("model.safetensors"), 0), 0u) << msg;
  EXPECT_NE(msg.find("model.safetensors: tensor 'layers.0.attn.wo.weight': data_offsets [0, 12] hold 12 bytes, "
                     "shape [2, 3] of F32 needs 24"),
            std::string::npos)
      << msg;
}

TEST_F(SafetensorsTest, TrailingBytes) {
  Bytes data = kGoodData;
  data.insert(data.end(), {1, 2, 3, 4, 5});
  write_bytes(path("trail.safetensors"), make_file(kGoodHeader, data));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("trail.safetensors")); });
  EXPECT_NE(msg.find("trail.safetensors: 5 trailing bytes after the last tensor"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, MetadataValuesMustBeStrings) {
  const std::string header =
      R"({"__metadata__":{"format":"pt","step":42},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  write_bytes(path("meta.safetensors"), make_file(header, Bytes(1, 0)));
  const std::string msg = error_of([&] { SafetensorsFile::open(path("meta.safetensors")); });
  EXPECT_NE(msg.find("meta.safetensors: __metadata__ value of 'step' must be a string"), std::string::npos) << msg;

  write_bytes(path("meta2.safetensors"), make_file(R"({"__metadata__":["pt"]})", {}));
  const std::string msg2 = error_of([&] { SafetensorsFile::open(path("meta2.safetensors")); });
  EXPECT_NE(msg2.find("meta2.safetensors: __metadata__ must be an object"), std::string::npos) << msg2;
}

TEST_F(SafetensorsTest, MalformedEntryFields) {
  struct Case {
    std::string entry, expected;
  };
  const Case cases[] = {
      {R"({"dtype":"F32","shape":[-1],"data_offsets":[0,0]})", "tensor 'x': shape [-1] must hold non-negative"},
      {R"({"dtype":"F32","shape":[1.5],"data_offsets":[0,0]})", "tensor 'x': shape [1.5] must hold non-negative"},
      {R"({"dtype":"F32","shape":[1]})", "tensor 'x': missing field 'data_offsets'"},
      {R"({"shape":[1],"data_offsets":[0,4]})", "tensor 'x': missing field 'dtype'"},
      {R"({"dtype":"F32","shape":[1],"data_offsets":[4,0]})", "tensor 'x': data_offsets must be [begin, end]"},
      {R"({"dtype":"F32","shape":[1],"data_offsets":[0]})", "tensor 'x': data_offsets must be [begin, end]"},
      {R"({"dtype":7,"shape":[1],"data_offsets":[0,4]})", "tensor 'x': dtype must be a string"},
      {R"([1,2])", "tensor 'x': entry must be an object"},
      {R"({"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]})",
       "tensor 'x': shape [4294967296, 4294967296, 4294967296] is too large"},
  };
  for (const auto& c : cases) {
    write_bytes(path("entry.safetensors"), make_file(R"({"x":)" + c.entry + "}", Bytes(4, 0)));
    const std::string msg = error_of([&] { SafetensorsFile::open(path("entry.safetensors")); });
    EXPECT_NE(msg.find("entry.safetensors: " + c.expected), std::string::npos) << c.entry << " -> " << msg;
  }
}

TEST_F(SafetensorsTest, ReadIntoWrongShapeNamesTensorAndBothShapes) {
  const float v[6] = {1, 2, 3, 4, 5, 6};
  SafetensorsWriter w;
  w.add("layers.0.wq", DType::kF32, {2, 3}, v);
  w.write(path("s.safetensors"));
  const auto f = SafetensorsFile::open(path("s.safetensors"));
  float out[6];
  const std::string msg = error_of([&] {
    f.read_into("layers.0.wq", Tensor{out, DType::kF32, Device::kCPU, Shape{3, 2}});
  });
  EXPECT_NE(msg.find("s.safetensors: tensor 'layers.0.wq': shape [2, 3] in the file, destination expects [3, 2]"),
            std::string::npos)
      << msg;
  const std::string missing = error_of([&] { f.get("layers.1.wq"); });
  EXPECT_NE(missing.find("s.safetensors: no tensor 'layers.1.wq'"), std::string::npos) << missing;
  EXPECT_FALSE(f.has("layers.1.wq"));
  EXPECT_TRUE(f.has("layers.0.wq"));
}

// ---- writer errors and atomicity ----

TEST_F(SafetensorsTest, WriterRejectsDuplicatesReservedNamesAndDeviceTensors) {
  const float v = 1;
  SafetensorsWriter w;
  w.add("a", DType::kF32, {}, &v);
  EXPECT_THROW(w.add("a", DType::kF32, {}, &v), Error);
  EXPECT_THROW(w.add("__metadata__", DType::kF32, {}, &v), Error);
  EXPECT_THROW(w.add("neg", DType::kF32, {-1}, &v), Error);
  EXPECT_THROW(w.add("null", DType::kF32, {2}, nullptr), Error);
  const std::string msg = error_of([&] {
    w.add("gpu", Tensor{const_cast<float*>(&v), DType::kF32, Device::kCUDA, Shape{}});
  });
  EXPECT_NE(msg.find("tensor 'gpu': only host tensors"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, WriteIntoMissingDirectoryFailsWithPathAndLeavesNothing) {
  const float v = 1;
  SafetensorsWriter w;
  w.add("a", DType::kF32, {}, &v);
  const std::string p = path("no_such_dir/out.safetensors");
  const std::string msg = error_of([&] { w.write(p); });
  EXPECT_EQ(msg.rfind(p, 0), 0u) << msg;
  EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(path("no_such_dir")));
  EXPECT_FALSE(has_temp_files());
}

TEST_F(SafetensorsTest, FailedWriteKeepsTheOldFileAndRemovesTheTemp) {
  const std::string p = path("ckpt.safetensors");
  const float old_value = 42.0f;
  SafetensorsWriter old_writer;
  old_writer.add("v", DType::kF32, {}, &old_value);
  old_writer.write(p);
  const Bytes old_bytes = read_bytes(p);

  // Make the next write fail midway: with RLIMIT_FSIZE below the file size, write() returns EFBIG
  // (SIGXFSZ, whose default action kills the process, is ignored for the duration).
  const std::vector<float> big(1 << 16, 3.0f);  // 256 KiB of data
  SafetensorsWriter w;
  w.add("v", DType::kF32, {static_cast<int64_t>(big.size())}, big.data());
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  rlimit small = saved;
  small.rlim_cur = 64 * 1024;
  auto* previous_handler = std::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string msg;
  try {
    w.write(p);
  } catch (const Error& e) {
    msg = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, previous_handler);

  EXPECT_EQ(msg.rfind(p, 0), 0u) << msg;
  EXPECT_NE(msg.find(std::strerror(EFBIG)), std::string::npos) << msg;
  EXPECT_EQ(read_bytes(p), old_bytes);  // the old file is untouched
  EXPECT_FALSE(has_temp_files());

  // The same write succeeds without the limit and replaces the file completely.
  w.write(p);
  EXPECT_FALSE(has_temp_files());
  const auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f.get("v").shape, std::vector<int64_t>{1 << 16});
  std::vector<float> out(big.size());
  f.read_into("v", Tensor{out.data(), DType::kF32, Device::kCPU, Shape{1 << 16}});
  EXPECT_EQ(out, big);
}

}  // namespace
}  // namespace diffmoe
