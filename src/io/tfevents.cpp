// TensorBoard event writer and reader (docs/formats.md §1a). Field numbers below are those of
// tensorboard/compat/proto/{event,summary,tensor,tensor_shape,histogram}.proto as listed in §1a.
#include "io/tfevents.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/error.h"
#include "io/crc32c.h"

namespace diffmoe {
namespace {

// Wire types (docs/formats.md §1a).
constexpr int kWireVarint = 0;
constexpr int kWireFixed64 = 1;
constexpr int kWireLengthDelimited = 2;
constexpr int kWireFixed32 = 5;

// Event
constexpr int kEventWallTime = 1;
constexpr int kEventStep = 2;
constexpr int kEventFileVersion = 3;
constexpr int kEventSummary = 5;
constexpr int kEventSessionLog = 7;
constexpr int kEventSourceMetadata = 10;
constexpr int kSourceMetadataWriter = 1;
constexpr int kSessionLogStatus = 1;
// Summary / Summary.Value
constexpr int kSummaryValue = 1;
constexpr int kValueTag = 1;
constexpr int kValueSimpleValue = 2;
constexpr int kValueHisto = 5;
constexpr int kValueTensor = 8;
constexpr int kValueMetadata = 9;
// SummaryMetadata / PluginData
constexpr int kMetadataPluginData = 1;
constexpr int kPluginDataPluginName = 1;
// HistogramProto
constexpr int kHistoMin = 1;
constexpr int kHistoMax = 2;
constexpr int kHistoNum = 3;
constexpr int kHistoSum = 4;
constexpr int kHistoSumSquares = 5;
constexpr int kHistoBucketLimit = 6;
constexpr int kHistoBucket = 7;
// TensorProto
constexpr int kTensorDtype = 1;
constexpr int kTensorShape = 2;
constexpr int kTensorFloatVal = 5;
constexpr int kTensorStringVal = 8;
constexpr uint64_t kDtFloat = 1;
constexpr uint64_t kDtString = 7;

constexpr const char* kFileVersion = "brain.Event:2";
constexpr std::string_view kEventFilePrefix = "events.out.tfevents.";
constexpr size_t kTimeDigits = 10;  // %010d: keeps lexicographic order == time order

// TFRecord header: u64 length + u32 masked crc of it; footer: u32 masked crc of the data.
constexpr size_t kLengthBytes = 8;
constexpr size_t kCrcBytes = 4;

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

void put_le(std::string& out, uint64_t v, size_t nbytes) {
  for (size_t i = 0; i < nbytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFFu));
}

uint64_t get_le(const char* p, size_t nbytes) {
  uint64_t v = 0;
  for (size_t i = 0; i < nbytes; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

std::string hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0') return "localhost";
  std::string h(buf);
  std::replace(h.begin(), h.end(), '/', '_');  // a path separator would break the file name
  return h;
}

// Largest 10-digit time prefix among event files already in `dir`, or -1.
int64_t latest_event_file_time(const std::filesystem::path& dir) {
  int64_t latest = -1;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (!name.starts_with(kEventFilePrefix) || name.size() < kEventFilePrefix.size() + kTimeDigits) continue;
    const std::string digits = name.substr(kEventFilePrefix.size(), kTimeDigits);
    if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    latest = std::max<int64_t>(latest, std::stoll(digits));
  }
  return latest;
}

ProtoEncoder event_header(int64_t step) {
  ProtoEncoder ev;
  ev.double_field(kEventWallTime, now_seconds());
  ev.int64_field(kEventStep, step);
  return ev;
}

ProtoEncoder plugin_metadata(std::string_view plugin_name) {
  ProtoEncoder plugin_data, metadata;
  plugin_data.bytes_field(kPluginDataPluginName, plugin_name);
  metadata.message_field(kMetadataPluginData, plugin_data);
  return metadata;
}

void decode_packed_doubles(const ProtoField& f, std::vector<double>& out, const char* what) {
  if (f.wire_type == kWireFixed64) {
    out.push_back(f.as_double());
    return;
  }
  DIFFMOE_CHECK(f.wire_type == kWireLengthDelimited && f.bytes.size() % 8 == 0,
                "[tfevents] {}: bad packed double field", what);
  for (size_t i = 0; i < f.bytes.size(); i += 8) out.push_back(std::bit_cast<double>(get_le(f.bytes.data() + i, 8)));
}

HistogramData decode_histogram(std::string_view data) {
  HistogramData h;
  ProtoDecoder dec(data);
  ProtoField f;
  while (dec.next(f)) {
    switch (f.number) {
      case kHistoMin: h.min = f.as_double(); break;
      case kHistoMax: h.max = f.as_double(); break;
      case kHistoNum: h.num = f.as_double(); break;
      case kHistoSum: h.sum = f.as_double(); break;
      case kHistoSumSquares: h.sum_squares = f.as_double(); break;
      case kHistoBucketLimit: decode_packed_doubles(f, h.bucket_limit, "bucket_limit"); break;
      case kHistoBucket: decode_packed_doubles(f, h.bucket, "bucket"); break;
      default: break;
    }
  }
  return h;
}

void decode_tensor(std::string_view data, DecodedValue& v) {
  uint64_t dtype = 0;
  std::optional<std::string> first_string;
  std::optional<float> first_float;
  ProtoDecoder dec(data);
  ProtoField f;
  while (dec.next(f)) {
    if (f.number == kTensorDtype) dtype = f.bits;
    if (f.number == kTensorStringVal && !first_string) first_string = std::string(f.bytes);
    if (f.number == kTensorFloatVal && !first_float) {
      if (f.wire_type == kWireFixed32) {
        first_float = f.as_float();
      } else if (f.wire_type == kWireLengthDelimited && f.bytes.size() >= 4) {
        first_float = std::bit_cast<float>(static_cast<uint32_t>(get_le(f.bytes.data(), 4)));
      }
    }
  }
  if (dtype == kDtString) v.text = first_string;
  if (dtype == kDtFloat) v.tensor_float = first_float;
}

DecodedValue decode_value(std::string_view data) {
  DecodedValue v;
  ProtoDecoder dec(data);
  ProtoField f;
  while (dec.next(f)) {
    switch (f.number) {
      case kValueTag: v.tag = std::string(f.bytes); break;
      case kValueSimpleValue: v.simple_value = f.as_float(); break;
      case kValueHisto: v.histogram = decode_histogram(f.bytes); break;
      case kValueTensor: decode_tensor(f.bytes, v); break;
      case kValueMetadata: {
        ProtoDecoder md(f.bytes);
        ProtoField g;
        while (md.next(g)) {
          if (g.number != kMetadataPluginData) continue;
          ProtoDecoder pd(g.bytes);
          ProtoField h;
          while (pd.next(h))
            if (h.number == kPluginDataPluginName) v.plugin_name = std::string(h.bytes);
        }
        break;
      }
      default: break;
    }
  }
  return v;
}

}  // namespace

// ---- ProtoEncoder / ProtoDecoder --------------------------------------------------------------

void ProtoEncoder::put_varint(uint64_t v) {
  while (v >= 0x80) {
    buf_.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  buf_.push_back(static_cast<char>(v));
}

void ProtoEncoder::put_tag(int field, int wire_type) {
  put_varint((static_cast<uint64_t>(field) << 3) | static_cast<uint64_t>(wire_type));
}

void ProtoEncoder::varint_field(int field, uint64_t v) {
  put_tag(field, kWireVarint);
  put_varint(v);
}

void ProtoEncoder::double_field(int field, double v) {
  put_tag(field, kWireFixed64);
  put_le(buf_, std::bit_cast<uint64_t>(v), 8);
}

void ProtoEncoder::float_field(int field, float v) {
  put_tag(field, kWireFixed32);
  put_le(buf_, std::bit_cast<uint32_t>(v), 4);
}

void ProtoEncoder::bytes_field(int field, std::string_view bytes) {
  put_tag(field, kWireLengthDelimited);
  put_varint(bytes.size());
  buf_.append(bytes);
}

void ProtoEncoder::packed_doubles_field(int field, std::span<const double> v) {
  put_tag(field, kWireLengthDelimited);
  put_varint(v.size() * 8);
  for (double d : v) put_le(buf_, std::bit_cast<uint64_t>(d), 8);
}

double ProtoField::as_double() const {
  DIFFMOE_CHECK(wire_type == kWireFixed64, "[protobuf] field {}: expected fixed64, got wire type {}", number,
                wire_type);
  return std::bit_cast<double>(bits);
}

float ProtoField::as_float() const {
  DIFFMOE_CHECK(wire_type == kWireFixed32, "[protobuf] field {}: expected fixed32, got wire type {}", number,
                wire_type);
  return std::bit_cast<float>(static_cast<uint32_t>(bits));
}

uint64_t ProtoDecoder::get_varint() {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    DIFFMOE_CHECK(pos_ < data_.size(), "[protobuf] truncated varint at byte {}", pos_);
    const auto b = static_cast<unsigned char>(data_[pos_++]);
    v |= static_cast<uint64_t>(b & 0x7F) << shift;
    if ((b & 0x80) == 0) return v;
  }
  DIFFMOE_FAIL("[protobuf] varint longer than 10 bytes at byte {}", pos_);
}

bool ProtoDecoder::next(ProtoField& out) {
  if (pos_ >= data_.size()) return false;
  const uint64_t key = get_varint();
  out = ProtoField{};
  out.number = static_cast<int>(key >> 3);
  out.wire_type = static_cast<int>(key & 7);
  DIFFMOE_CHECK(out.number > 0, "[protobuf] field number 0 at byte {}", pos_);
  auto need = [&](size_t n) {
    DIFFMOE_CHECK(data_.size() - pos_ >= n, "[protobuf] field {} truncated: needs {} bytes, {} left", out.number, n,
                  data_.size() - pos_);
  };
  switch (out.wire_type) {
    case kWireVarint: out.bits = get_varint(); break;
    case kWireFixed64:
      need(8);
      out.bits = get_le(data_.data() + pos_, 8);
      pos_ += 8;
      break;
    case kWireFixed32:
      need(4);
      out.bits = get_le(data_.data() + pos_, 4);
      pos_ += 4;
      break;
    case kWireLengthDelimited: {
      const uint64_t n = get_varint();
      need(n);
      out.bytes = data_.substr(pos_, n);
      pos_ += n;
      break;
    }
    default: DIFFMOE_FAIL("[protobuf] field {}: unsupported wire type {}", out.number, out.wire_type);
  }
  return true;
}

// ---- Histograms -------------------------------------------------------------------------------

HistogramData histogram_from_values(std::span<const float> values, int num_buckets) {
  DIFFMOE_CHECK(num_buckets >= 1, "[histogram] num_buckets must be >= 1, got {}", num_buckets);
  HistogramData h;
  bool any = false;
  for (float x : values) {
    if (!std::isfinite(x)) continue;
    const double d = x;
    h.min = any ? std::min(h.min, d) : d;
    h.max = any ? std::max(h.max, d) : d;
    any = true;
    h.num += 1;
    h.sum += d;
    h.sum_squares += d * d;
  }
  if (!any || h.min == h.max) {  // a single bucket whose right edge is the only value
    h.bucket_limit = {h.max};
    h.bucket = {h.num};
    return h;
  }
  const auto k = static_cast<size_t>(num_buckets);
  const double width = (h.max - h.min) / static_cast<double>(k);
  h.bucket_limit.resize(k);
  h.bucket.assign(k, 0.0);
  for (size_t i = 0; i < k; ++i) h.bucket_limit[i] = h.min + width * static_cast<double>(i + 1);
  h.bucket_limit[k - 1] = h.max;  // exact, whatever the rounding above
  for (float x : values) {
    if (!std::isfinite(x)) continue;
    // Bucket i holds [limit[i-1], limit[i]); the top value falls into the last bucket.
    const double pos = (static_cast<double>(x) - h.min) / width;
    const size_t i = std::min(k - 1, static_cast<size_t>(std::max(0.0, pos)));
    h.bucket[i] += 1;
  }
  return h;
}

// ---- Writer -----------------------------------------------------------------------------------

std::string frame_tfrecord(std::string_view data) {
  std::string rec;
  rec.reserve(kLengthBytes + 2 * kCrcBytes + data.size());
  put_le(rec, data.size(), kLengthBytes);
  put_le(rec, masked_crc32c(rec.data(), kLengthBytes), kCrcBytes);
  rec.append(data);
  put_le(rec, masked_crc32c(data), kCrcBytes);
  return rec;
}

EventWriter::EventWriter(const std::string& run_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  DIFFMOE_CHECK(!ec && fs::is_directory(run_dir), "[tfevents] {}: cannot create run directory: {}", run_dir,
                ec ? ec.message() : "not a directory");

  // Start past every existing event file so this one sorts last (docs/formats.md §1a: files of a run
  // are read in lexicographic order; a resumed run's START must come after the crashed run).
  int64_t t = std::max<int64_t>(static_cast<int64_t>(std::time(nullptr)), latest_event_file_time(run_dir) + 1);
  const std::string suffix = fmt::format(".{}.{}.diffmoe", hostname(), static_cast<long>(getpid()));
  constexpr int kMaxAttempts = 1000;
  for (int attempt = 0; attempt < kMaxAttempts && fd_ < 0; ++attempt, ++t) {
    path_ = (fs::path(run_dir) / fmt::format("{}{:010d}{}", kEventFilePrefix, t, suffix)).string();
    // O_EXCL: never append to, or truncate, a file someone else made (docs/formats.md §1a).
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    DIFFMOE_CHECK(fd_ >= 0 || errno == EEXIST, "[tfevents] {}: cannot create: {}", path_, std::strerror(errno));
  }
  DIFFMOE_CHECK(fd_ >= 0, "[tfevents] {}: no free event file name after {} attempts", run_dir, kMaxAttempts);

  try {
    ProtoEncoder source, ev;
    source.bytes_field(kSourceMetadataWriter, "diffmoe");
    ev.double_field(kEventWallTime, now_seconds());
    ev.bytes_field(kEventFileVersion, kFileVersion);
    ev.message_field(kEventSourceMetadata, source);
    write_event(ev);
    flush();  // the file is valid (and visible to TensorBoard) from the start
  } catch (...) {
    ::close(fd_);  // the destructor does not run for a throwing constructor
    throw;
  }
}

EventWriter::~EventWriter() {
  try {
    close();
  } catch (...) {
    // A destructor must not throw; callers who care call close() and see the error.
  }
}

void EventWriter::add_scalar(const std::string& tag, int64_t step, float value) {
  ProtoEncoder val, summary;
  val.bytes_field(kValueTag, tag);
  val.float_field(kValueSimpleValue, value);
  summary.message_field(kSummaryValue, val);
  ProtoEncoder ev = event_header(step);
  ev.message_field(kEventSummary, summary);
  write_event(ev);
}

void EventWriter::add_histogram(const std::string& tag, int64_t step, std::span<const float> values, int num_buckets) {
  add_histogram(tag, step, histogram_from_values(values, num_buckets));
}

void EventWriter::add_histogram(const std::string& tag, int64_t step, const HistogramData& h) {
  DIFFMOE_CHECK(!h.bucket.empty() && h.bucket.size() == h.bucket_limit.size(),
                "[tfevents] histogram '{}': {} bucket counts vs {} limits (need equal, >= 1)", tag, h.bucket.size(),
                h.bucket_limit.size());
  ProtoEncoder histo, val, summary;
  histo.double_field(kHistoMin, h.min);
  histo.double_field(kHistoMax, h.max);
  histo.double_field(kHistoNum, h.num);
  histo.double_field(kHistoSum, h.sum);
  histo.double_field(kHistoSumSquares, h.sum_squares);
  histo.packed_doubles_field(kHistoBucketLimit, h.bucket_limit);
  histo.packed_doubles_field(kHistoBucket, h.bucket);
  val.bytes_field(kValueTag, tag);
  val.message_field(kValueHisto, histo);
  summary.message_field(kSummaryValue, val);
  ProtoEncoder ev = event_header(step);
  ev.message_field(kEventSummary, summary);
  write_event(ev);
}

void EventWriter::add_text(const std::string& tag, int64_t step, const std::string& markdown) {
  ProtoEncoder tensor, val, summary;
  tensor.varint_field(kTensorDtype, kDtString);
  tensor.bytes_field(kTensorShape, "");  // empty TensorShapeProto = rank 0
  tensor.bytes_field(kTensorStringVal, markdown);
  val.bytes_field(kValueTag, tag);
  if (tags_with_metadata_.insert(tag).second) val.message_field(kValueMetadata, plugin_metadata("text"));
  val.message_field(kValueTensor, tensor);
  summary.message_field(kSummaryValue, val);
  ProtoEncoder ev = event_header(step);
  ev.message_field(kEventSummary, summary);
  write_event(ev);
}

void EventWriter::session_start(int64_t step) {
  ProtoEncoder log;
  log.varint_field(kSessionLogStatus, static_cast<uint64_t>(SessionStatus::kStart));
  ProtoEncoder ev = event_header(step);
  ev.message_field(kEventSessionLog, log);
  write_event(ev);
}

void EventWriter::write_event(const ProtoEncoder& event) {
  DIFFMOE_CHECK(fd_ >= 0, "[tfevents] {}: write after close", path_);
  buffer_ += frame_tfrecord(event.bytes());
  if (buffer_.size() >= kWriteThresholdBytes) write_buffer();
}

void EventWriter::write_buffer() {
  size_t done = 0;
  while (done < buffer_.size()) {
    const ssize_t n = ::write(fd_, buffer_.data() + done, buffer_.size() - done);
    if (n < 0 && errno == EINTR) continue;
    DIFFMOE_CHECK(n > 0, "[tfevents] {}: write failed: {}", path_, n < 0 ? std::strerror(errno) : "no progress");
    done += static_cast<size_t>(n);
  }
  buffer_.clear();
}

void EventWriter::flush() {
  if (fd_ < 0) return;
  write_buffer();
  DIFFMOE_CHECK(::fsync(fd_) == 0, "[tfevents] {}: fsync failed: {}", path_, std::strerror(errno));
}

void EventWriter::close() {
  if (fd_ < 0) return;
  flush();
  const int fd = fd_;
  fd_ = -1;
  DIFFMOE_CHECK(::close(fd) == 0, "[tfevents] {}: close failed: {}", path_, std::strerror(errno));
}

// ---- Reader -----------------------------------------------------------------------------------

std::vector<std::string> read_event_records(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DIFFMOE_CHECK(in.good(), "[tfevents] {}: cannot open", path);
  const std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  DIFFMOE_CHECK(!in.bad(), "[tfevents] {}: read error", path);

  std::vector<std::string> records;
  size_t pos = 0;
  while (pos < file.size()) {
    const size_t index = records.size();
    const size_t left = file.size() - pos;
    DIFFMOE_CHECK(left >= kLengthBytes + kCrcBytes, "[tfevents] {}: record {} at byte {}: truncated header ({} bytes)",
                  path, index, pos, left);
    const uint64_t len = get_le(file.data() + pos, kLengthBytes);
    const auto len_crc = static_cast<uint32_t>(get_le(file.data() + pos + kLengthBytes, kCrcBytes));
    DIFFMOE_CHECK(len_crc == masked_crc32c(file.data() + pos, kLengthBytes),
                  "[tfevents] {}: record {} at byte {}: bad length CRC", path, index, pos);
    const size_t body = kLengthBytes + kCrcBytes;
    DIFFMOE_CHECK(len <= left - body && left - body - len >= kCrcBytes,
                  "[tfevents] {}: record {} at byte {}: truncated (length {}, {} bytes left)", path, index, pos, len,
                  left - body);
    const std::string_view data(file.data() + pos + body, len);
    const auto data_crc = static_cast<uint32_t>(get_le(file.data() + pos + body + len, kCrcBytes));
    DIFFMOE_CHECK(data_crc == masked_crc32c(data), "[tfevents] {}: record {} at byte {}: bad data CRC", path, index,
                  pos);
    records.emplace_back(data);
    pos += body + len + kCrcBytes;
  }
  return records;
}

DecodedEvent decode_event(std::string_view data) {
  DecodedEvent e;
  ProtoDecoder dec(data);
  ProtoField f;
  while (dec.next(f)) {
    switch (f.number) {
      case kEventWallTime: e.wall_time = f.as_double(); break;
      case kEventStep: e.step = static_cast<int64_t>(f.bits); break;
      case kEventFileVersion: e.file_version = std::string(f.bytes); break;
      case kEventSummary: {
        ProtoDecoder sd(f.bytes);
        ProtoField g;
        while (sd.next(g))
          if (g.number == kSummaryValue) e.values.push_back(decode_value(g.bytes));
        break;
      }
      case kEventSessionLog: {
        e.session_status = SessionStatus::kUnspecified;  // proto3 omits a zero status
        ProtoDecoder ld(f.bytes);
        ProtoField g;
        while (ld.next(g))
          if (g.number == kSessionLogStatus) e.session_status = static_cast<SessionStatus>(g.bits);
        break;
      }
      default: break;
    }
  }
  return e;
}

}  // namespace diffmoe
