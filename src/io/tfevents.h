// TensorBoard event files (docs/formats.md §1a): TFRecord framing with masked CRC32C around serialized
// tensorboard.Event protobufs, written by a hand-rolled encoder (no libprotobuf). Also a small
// reader and decoder, enough for tests and tools to check what we wrote.
//
// Threading: an EventWriter is used from one thread. Writes go to an in-memory buffer and reach
// the file when it grows past kWriteThresholdBytes or on flush() (the trainer flushes after every
// step), so between flushes an add_* call costs a memory copy.
#pragma once
#include <cstdint>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace diffmoe {

// ---- Minimal protobuf wire format -------------------------------------------------------------
// Wire types (docs/formats.md §1a): 0 varint, 1 fixed64 (double), 2 length-delimited, 5 fixed32 (float).
class ProtoEncoder {
 public:
  void varint_field(int field, uint64_t v);
  void int64_field(int field, int64_t v) { varint_field(field, static_cast<uint64_t>(v)); }
  void double_field(int field, double v);
  void float_field(int field, float v);
  void bytes_field(int field, std::string_view bytes);  // also strings and sub-messages
  void message_field(int field, const ProtoEncoder& m) { bytes_field(field, m.bytes()); }
  void packed_doubles_field(int field, std::span<const double> v);
  const std::string& bytes() const { return buf_; }

 private:
  void put_varint(uint64_t v);
  void put_tag(int field, int wire_type);
  std::string buf_;
};

// One decoded field. For wire types 0/1/5 `bits` holds the raw value (for 1 and 5, the IEEE bits);
// for wire type 2 `bytes` views the payload inside the decoder's input.
struct ProtoField {
  int number = 0;
  int wire_type = 0;
  uint64_t bits = 0;
  std::string_view bytes;
  double as_double() const;  // wire type 1
  float as_float() const;    // wire type 5
};

// Iterates the fields of one message; throws diffmoe::Error on malformed input (truncated varint
// or payload, unsupported wire type such as the deprecated groups).
class ProtoDecoder {
 public:
  explicit ProtoDecoder(std::string_view data) : data_(data) {}
  bool next(ProtoField& out);

 private:
  uint64_t get_varint();
  std::string_view data_;
  size_t pos_ = 0;
};

// ---- Event content ----------------------------------------------------------------------------
// HistogramProto (docs/formats.md §1a): bucket_limit[i] is the right edge of bucket i, bucket[i] its count.
struct HistogramData {
  double min = 0, max = 0, num = 0, sum = 0, sum_squares = 0;
  std::vector<double> bucket_limit;
  std::vector<double> bucket;
};

// `num_buckets` equal-width buckets over [min, max] of the finite values (NaN/±inf are left out of
// every statistic, so `num` counts finite values only). The last limit is exactly max, which is
// what TensorBoard substitutes for it anyway (data_compat `_migrate_histogram_value`).
// No values: one empty bucket at 0. All values equal: one bucket holding them all.
HistogramData histogram_from_values(std::span<const float> values, int num_buckets = 30);

// SessionLog.SessionStatus values.
enum class SessionStatus : int { kUnspecified = 0, kStart = 1, kStop = 2, kCheckpoint = 3 };

// ---- Writer -----------------------------------------------------------------------------------
class EventWriter {
 public:
  static constexpr size_t kWriteThresholdBytes = 256 * 1024;

  // Creates `run_dir` if missing and a NEW file in it (never appends: a reader stops at a torn
  // record, docs/formats.md §1a). The name is events.out.tfevents.%010d.<hostname>.<pid>.diffmoe with
  // the 10-digit time bumped past any event file already in the directory, so files sort in
  // creation order (TensorBoard reads a run's files lexicographically). Writes the file_version
  // record. Throws diffmoe::Error naming the path on failure.
  explicit EventWriter(const std::string& run_dir);
  ~EventWriter();  // close(), swallowing errors: call close() yourself to see them
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;

  // Legacy Value{tag, simple_value} — read by every TensorBoard version (docs/formats.md §1a).
  void add_scalar(const std::string& tag, int64_t step, float value);
  // Legacy Value{tag, histo}; TensorBoard migrates it to the `histograms` plugin itself.
  void add_histogram(const std::string& tag, int64_t step, std::span<const float> values, int num_buckets = 30);
  void add_histogram(const std::string& tag, int64_t step, const HistogramData& histogram);
  // Markdown text: plugin "text", rank-0 DT_STRING tensor. Metadata goes with the first record
  // of each tag in this file only (TensorBoard keeps the first metadata seen per tag).
  void add_text(const std::string& tag, int64_t step, const std::string& markdown);
  // SessionLog START (docs/formats.md §1a "On resume"): on a later START the Python loaders purge
  // orphaned events with step >= `step`. Call it first thing in EVERY run, fresh ones included
  // (step 0): plugin_event_accumulator treats the first START of a run as the initial one and
  // purges only on later STARTs, so a resume after a run without START would purge nothing there.
  // (The legacy event_accumulator purges on every START; the Rust data server ignores SessionLog
  // and instead lets a re-logged step preempt the later points of that tag.)
  void session_start(int64_t step);

  // Writes our buffer to the file (it plays stdio's part, so this is fflush) and fsyncs: the
  // records so far survive a crash. Call at checkpoints and every few seconds (docs/formats.md §1a).
  void flush();
  // flush() and close the file. Idempotent; any add_* afterwards throws.
  void close();

  const std::string& path() const { return path_; }

 private:
  void write_event(const ProtoEncoder& event);
  void write_buffer();
  std::string path_;
  int fd_ = -1;
  std::string buffer_;
  std::set<std::string> tags_with_metadata_;
};

// Encodes one TFRecord: u64 length, masked crc of the length, data, masked crc of the data.
std::string frame_tfrecord(std::string_view data);

// ---- Reader (tests and tools) -----------------------------------------------------------------
// Returns each record's data, verifying both CRCs. Stricter than TensorBoard (which waits on a
// truncated tail): throws diffmoe::Error naming the file, the record index and the byte offset on
// a bad length CRC, a bad data CRC or a truncated record.
std::vector<std::string> read_event_records(const std::string& path);

struct DecodedValue {
  std::string tag;
  std::string plugin_name;  // empty when the value carries no metadata
  std::optional<float> simple_value;
  std::optional<HistogramData> histogram;
  std::optional<std::string> text;    // first string_val of a DT_STRING tensor
  std::optional<float> tensor_float;  // first float_val of a DT_FLOAT tensor
};

struct DecodedEvent {
  double wall_time = 0;
  int64_t step = 0;
  std::optional<std::string> file_version;
  std::optional<SessionStatus> session_status;
  std::vector<DecodedValue> values;  // Summary values, in order
};

DecodedEvent decode_event(std::string_view data);

}  // namespace diffmoe
