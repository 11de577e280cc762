// TensorBoard event files (docs/formats.md §1a): CRC32C vectors, the two CRC paths agreeing, and
// written files read back with every CRC checked and every value decoded.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "core/error.h"
#include "io/crc32c.h"
#include "io/tfevents.h"
#include "io_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

namespace fs = std::filesystem;
using test::expect_error;
using test::read_file;
using test::write_file;

std::vector<fs::path> event_files(const fs::path& dir) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find("tfevents") != std::string::npos) out.push_back(e.path());
  std::sort(out.begin(), out.end());  // TensorBoard's order (docs/formats.md §1a)
  return out;
}

std::vector<DecodedEvent> decode_file(const fs::path& p) {
  std::vector<DecodedEvent> out;
  for (const auto& rec : read_event_records(p.string())) out.push_back(decode_event(rec));
  return out;
}

// ---- CRC32C -----------------------------------------------------------------------------------

TEST(Crc32c, KnownVectors) {
  // docs/formats.md §1a test vectors.
  EXPECT_EQ(crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(crc32c_table("123456789", 9), 0xE3069283u);
  const std::string zeros(32, '\0');
  EXPECT_EQ(crc32c(zeros), 0x8a9136aau);
  EXPECT_EQ(crc32c_table(zeros.data(), zeros.size()), 0x8a9136aau);
  const std::string file_version_record = std::string("\x1a\x11") + "CRC test, one two";
  EXPECT_EQ(masked_crc32c(file_version_record), 0x5794d08au);
  EXPECT_EQ(crc32c("", 0), 0u);  // init ~0 then final xor ~0
}

TEST(Crc32c, TableAndSse42AgreeOnEveryLength) {
  if (!crc32c_sse42_available()) GTEST_SKIP() << "CPU without SSE4.2: only the table path exists";
  std::mt19937 rng(1234);
  std::vector<unsigned char> buf(300 + 8);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  // Every length 0..300, at 8 start offsets so the 8-byte loop meets every misalignment and tail.
  for (size_t offset = 0; offset < 8; ++offset) {
    for (size_t n = 0; n <= 300; ++n) {
      ASSERT_EQ(crc32c_table(buf.data() + offset, n), crc32c_sse42(buf.data() + offset, n))
          << "offset " << offset << " length " << n;
    }
  }
  EXPECT_EQ(crc32c_sse42("123456789", 9), 0xE3069283u);
}

// ---- Protobuf encoder/decoder -----------------------------------------------------------------

TEST(ProtoWire, RoundTripsEveryWireType) {
  ProtoEncoder enc;
  enc.varint_field(1, 0);
  enc.varint_field(2, 300);  // two-byte varint (0xAC 0x02)
  enc.int64_field(3, -5);    // negative int64: ten-byte varint
  enc.double_field(4, -1.25);
  enc.float_field(5, 3.5f);
  enc.bytes_field(6, std::string("a\0b", 3));
  const std::vector<double> packed = {1.0, -2.5, 1e300};
  enc.packed_doubles_field(7, packed);
  // 300 = 0b10'0101100 -> 0xAC 0x02, after the key byte (2 << 3 | 0) = 0x10.
  EXPECT_EQ(enc.bytes().substr(2, 3), std::string("\x10\xAC\x02"));

  ProtoDecoder dec(enc.bytes());
  ProtoField f;
  ASSERT_TRUE(dec.next(f));
  EXPECT_EQ(f.number, 1);
  EXPECT_EQ(f.bits, 0u);
  ASSERT_TRUE(dec.next(f));
  EXPECT_EQ(f.bits, 300u);
  ASSERT_TRUE(dec.next(f));
  EXPECT_EQ(static_cast<int64_t>(f.bits), -5);
  ASSERT_TRUE(dec.next(f));
  EXPECT_EQ(f.as_double(), -1.25);
  ASSERT_TRUE(dec.next(f));
  EXPECT_EQ(f.as_float(), 3.5f);
  ASSERT_TRUE(dec.next(f));
  EXPECT_EQ(f.bytes, std::string_view("a\0b", 3));
  ASSERT_TRUE(dec.next(f));
  EXPECT_EQ(f.wire_type, 2);
  EXPECT_EQ(f.bytes.size(), 24u);
  EXPECT_FALSE(dec.next(f));

  // A length that runs past the end is an error, not a silent short read.
  const std::string bad = enc.bytes().substr(0, enc.bytes().size() - 1);
  ProtoDecoder dec2(bad);
  expect_error(
      [&] {
        while (dec2.next(f)) {
        }
      },
      {"truncated"});
}

// ---- Histograms -------------------------------------------------------------------------------

TEST(Histogram, FromValuesCountsAndEdges) {
  const std::vector<float> v = {-1.0f, -0.5f, 0.0f, 0.25f, 0.5f, 1.0f, 3.0f, NAN, INFINITY};
  const HistogramData h = histogram_from_values(v, 4);
  EXPECT_EQ(h.min, -1.0);
  EXPECT_EQ(h.max, 3.0);
  EXPECT_EQ(h.num, 7.0);  // non-finite values are left out
  EXPECT_DOUBLE_EQ(h.sum, -1.0 - 0.5 + 0.25 + 0.5 + 1.0 + 3.0);
  EXPECT_DOUBLE_EQ(h.sum_squares, 1.0 + 0.25 + 0.0625 + 0.25 + 1.0 + 9.0);
  ASSERT_EQ(h.bucket_limit.size(), 4u);
  EXPECT_EQ(h.bucket_limit, (std::vector<double>{0.0, 1.0, 2.0, 3.0}));
  // [-1,0): -1,-0.5   [0,1): 0,0.25,0.5   [1,2): 1   [2,3]: 3
  EXPECT_EQ(h.bucket, (std::vector<double>{2, 3, 1, 1}));

  const std::vector<float> same = {2.0f, 2.0f, 2.0f};
  const HistogramData s = histogram_from_values(same, 30);
  EXPECT_EQ(s.bucket_limit, std::vector<double>{2.0});
  EXPECT_EQ(s.bucket, std::vector<double>{3.0});
}

// ---- Writing and reading back -----------------------------------------------------------------

TEST(EventWriter, WritesFileReadBackWithEveryValue) {
  test::TempDir dir("tfevents");
  const fs::path run = dir.path() / "run" / "nested";  // created by the writer
  const std::vector<float> weights = {0.5f, -1.5f, 2.0f, 0.25f, 1.0f};
  const std::string markdown = "**step 2** sample:\n\n> It is a truth universally acknowledged";
  std::string written_path;
  {
    EventWriter w(run.string());
    written_path = w.path();
    w.add_scalar("train/loss", 0, 3.0f);
    w.add_scalar("train/loss", 1, 2.75f);
    w.add_histogram("weights/w0", 1, weights, 5);
    w.add_text("samples/generation", 2, markdown);
    w.add_text("samples/generation", 3, "second");
    w.add_scalar("train/loss", 3, 2.5f);
    w.session_start(4);
    w.close();
    expect_error([&] { w.add_scalar("train/loss", 5, 1.0f); }, {"after close"});
  }
  const auto files = event_files(run);
  ASSERT_EQ(files.size(), 1u);
  EXPECT_EQ(files[0].string(), written_path);
  const std::string name = files[0].filename().string();
  // events.out.tfevents.%010d.<host>.<pid>.diffmoe (docs/formats.md §1a)
  ASSERT_TRUE(name.starts_with("events.out.tfevents."));
  EXPECT_TRUE(std::all_of(name.begin() + 20, name.begin() + 30, [](char c) { return c >= '0' && c <= '9'; }));
  EXPECT_EQ(name[30], '.');
  EXPECT_TRUE(name.ends_with(fmt::format(".{}.diffmoe", getpid())));

  const auto ev = decode_file(files[0]);
  ASSERT_EQ(ev.size(), 8u);
  ASSERT_TRUE(ev[0].file_version.has_value());
  EXPECT_EQ(*ev[0].file_version, "brain.Event:2");
  for (const auto& e : ev) EXPECT_GT(e.wall_time, 1.6e9);  // seconds since the epoch, not ms or 0

  ASSERT_EQ(ev[1].values.size(), 1u);
  EXPECT_EQ(ev[1].step, 0);
  EXPECT_EQ(ev[1].values[0].tag, "train/loss");
  EXPECT_EQ(ev[1].values[0].simple_value, 3.0f);
  EXPECT_EQ(ev[2].step, 1);
  EXPECT_EQ(ev[2].values[0].simple_value, 2.75f);

  ASSERT_EQ(ev[3].values.size(), 1u);
  EXPECT_EQ(ev[3].values[0].tag, "weights/w0");
  ASSERT_TRUE(ev[3].values[0].histogram.has_value());
  const HistogramData& h = *ev[3].values[0].histogram;
  const HistogramData expect = histogram_from_values(weights, 5);
  EXPECT_EQ(h.min, -1.5);
  EXPECT_EQ(h.max, 2.0);
  EXPECT_EQ(h.num, 5.0);
  EXPECT_EQ(h.sum, expect.sum);
  EXPECT_EQ(h.sum_squares, expect.sum_squares);
  EXPECT_EQ(h.bucket_limit, expect.bucket_limit);
  EXPECT_EQ(h.bucket, expect.bucket);

  ASSERT_EQ(ev[4].values.size(), 1u);
  EXPECT_EQ(ev[4].step, 2);
  EXPECT_EQ(ev[4].values[0].tag, "samples/generation");
  EXPECT_EQ(ev[4].values[0].plugin_name, "text");
  EXPECT_EQ(ev[4].values[0].text, markdown);
  EXPECT_EQ(ev[5].values[0].plugin_name, "");  // metadata only on a tag's first record
  EXPECT_EQ(ev[5].values[0].text, "second");
  EXPECT_EQ(ev[6].values[0].simple_value, 2.5f);

  EXPECT_EQ(ev[7].step, 4);
  EXPECT_TRUE(ev[7].values.empty());
  EXPECT_EQ(ev[7].session_status, SessionStatus::kStart);
}

TEST(EventWriter, PrecomputedHistogramIsWrittenAsGiven) {
  test::TempDir dir("tfevents");
  HistogramData h;  // e.g. reduced on the GPU (docs/formats.md §1a practical notes)
  h.min = -4;
  h.max = 4;
  h.num = 10;
  h.sum = 1.5;
  h.sum_squares = 40;
  h.bucket_limit = {-2, 0, 2, 4};
  h.bucket = {1, 4, 3, 2};
  std::string path;
  {
    EventWriter w(dir.path().string());
    path = w.path();
    w.add_histogram("acts/h", 7, h);
    HistogramData bad = h;
    bad.bucket.pop_back();
    expect_error([&] { w.add_histogram("acts/h", 8, bad); }, {"acts/h", "limits"});
  }
  const auto ev = decode_file(path);
  ASSERT_EQ(ev.size(), 2u);
  const auto& got = ev[1].values.at(0).histogram.value();
  EXPECT_EQ(ev[1].step, 7);
  EXPECT_EQ(got.min, h.min);
  EXPECT_EQ(got.max, h.max);
  EXPECT_EQ(got.num, h.num);
  EXPECT_EQ(got.sum, h.sum);
  EXPECT_EQ(got.sum_squares, h.sum_squares);
  EXPECT_EQ(got.bucket_limit, h.bucket_limit);
  EXPECT_EQ(got.bucket, h.bucket);
}

TEST(EventWriter, FlushMakesRecordsVisibleBeforeClose) {
  test::TempDir dir("tfevents");
  EventWriter w(dir.path().string());
  w.add_scalar("a", 0, 1.0f);
  w.flush();
  const auto ev = decode_file(w.path());
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[1].values.at(0).simple_value, 1.0f);
}

// Writes a small run and returns its file.
fs::path write_small_run(const fs::path& dir) {
  EventWriter w(dir.string());
  for (int step = 0; step < 4; ++step) w.add_scalar("train/loss", step, 4.0f - 0.5f * static_cast<float>(step));
  w.close();
  return w.path();
}

TEST(EventReader, DetectsACorruptedByte) {
  test::TempDir dir("tfevents");
  const fs::path p = write_small_run(dir.path());
  const std::string good = read_file(p);
  const auto records = read_event_records(p.string());
  ASSERT_EQ(records.size(), 5u);
  const size_t rec0 = frame_tfrecord(records[0]).size();  // 12-byte header + data + 4-byte CRC
  const size_t rec1 = frame_tfrecord(records[1]).size();

  // A flipped byte in record 2's payload: its data CRC no longer matches.
  std::string bad = good;
  bad[rec0 + rec1 + 12 + 3] ^= 0x01;
  write_file(p, bad);
  expect_error([&] { read_event_records(p.string()); }, {p.string(), "record 2", "bad data CRC"});

  // A flipped byte in record 1's length: the length CRC catches it before the length is used.
  bad = good;
  bad[rec0 + 1] ^= 0x40;
  write_file(p, bad);
  expect_error([&] { read_event_records(p.string()); }, {p.string(), "record 1", "bad length CRC"});

  // A flipped byte in record 3's trailing data CRC.
  bad = good;
  bad[bad.size() - 1] ^= 0x80;
  write_file(p, bad);
  expect_error([&] { read_event_records(p.string()); }, {"record 4", "bad data CRC"});
}

TEST(EventReader, DetectsATruncatedTail) {
  test::TempDir dir("tfevents");
  const fs::path p = write_small_run(dir.path());
  const std::string good = read_file(p);
  ASSERT_EQ(read_event_records(p.string()).size(), 5u);
  for (size_t cut : {1, 4, 5, 20}) {
    write_file(p, good.substr(0, good.size() - cut));
    expect_error([&] { read_event_records(p.string()); }, {p.string(), "record 4", "truncated"});
  }
  // A partial header (fewer than 12 bytes of the next record) is truncation too.
  write_file(p, good + std::string(7, '\0'));
  expect_error([&] { read_event_records(p.string()); }, {"record 5", "truncated"});
}

TEST(EventWriter, TwoWritersMakeTwoFilesInCreationOrder) {
  test::TempDir dir("tfevents");
  std::string first, second;
  {
    EventWriter a(dir.path().string());
    a.add_scalar("train/loss", 0, 1.0f);
    first = a.path();
    // Same process, same second: the name must still be new and sort after the first.
    EventWriter b(dir.path().string());
    b.session_start(1);
    b.add_scalar("train/loss", 1, 0.5f);
    second = b.path();
  }
  const auto files = event_files(dir.path());
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files[0].string(), first);
  EXPECT_EQ(files[1].string(), second);
  const auto ev0 = decode_file(files[0]);
  const auto ev1 = decode_file(files[1]);
  ASSERT_EQ(ev0.size(), 2u);
  ASSERT_EQ(ev1.size(), 3u);
  EXPECT_EQ(ev1[0].file_version, "brain.Event:2");  // every file starts with its own version record
  EXPECT_EQ(ev1[1].session_status, SessionStatus::kStart);

  // A third writer after both closed still never reopens an old file.
  std::string third;
  {
    EventWriter c(dir.path().string());
    third = c.path();
  }
  const auto files3 = event_files(dir.path());
  ASSERT_EQ(files3.size(), 3u);
  EXPECT_EQ(files3[2].string(), third);
  EXPECT_EQ(decode_file(files[0]).size(), 2u);  // untouched
}

// Not a check by itself: when DIFFMOE_TFEVENTS_SAMPLE_DIR is set, writes a sample run there for
// tools/reference/check_tfevents.py (TensorBoard 2.21 on the GPU machine). The run has a crashed
// first file with a point at step 4 and a resumed second file starting at step 3, so the real
// loaders' purge on SessionLog START (docs/formats.md §1a "On resume") is exercised too:
//   python3 tools/reference/check_tfevents.py "$DIR" --scalar train/loss=0,1,2,3,4,5
//     --scalar train/lr=0,1,2,3,4,5 --histogram weights/w0=5 --text samples/generation=0,5
// (one command line).
TEST(EventWriter, WritesSampleRunWhenAsked) {
  const char* dir = std::getenv("DIFFMOE_TFEVENTS_SAMPLE_DIR");
  if (dir == nullptr || *dir == '\0') GTEST_SKIP() << "DIFFMOE_TFEVENTS_SAMPLE_DIR not set";
  std::vector<float> weights(1000);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (auto& x : weights) x = normal(rng);
  {
    EventWriter crashed(dir);
    crashed.session_start(0);  // a run's first START is "initial"; only later ones purge
    for (int step = 0; step <= 4; ++step) {
      crashed.add_scalar("train/loss", step, 10.0f - static_cast<float>(step));  // steps 3,4 orphaned
      crashed.add_scalar("train/lr", step, 1e-3f);
    }
    crashed.add_histogram("weights/w0", 4, weights);  // orphaned: purged after the resume below
    crashed.add_text("samples/generation", 0, "**orphan check** step 0 sample");
  }
  {
    EventWriter resumed(dir);
    resumed.session_start(3);
    for (int step = 3; step <= 5; ++step) {
      resumed.add_scalar("train/loss", step, 5.0f - 0.5f * static_cast<float>(step));
      resumed.add_scalar("train/lr", step, 1e-3f);
    }
    resumed.add_histogram("weights/w0", 5, weights);
    resumed.add_text("samples/generation", 5, "# Sample\n\nIt is a truth *universally* acknowledged…");
  }
  EXPECT_GE(event_files(dir).size(), 2u);
}

}  // namespace
}  // namespace diffmoe
