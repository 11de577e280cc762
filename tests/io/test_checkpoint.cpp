// Atomic checkpoint tests (docs/formats.md §4.6): round trip, manifest written last, keep-last-k plus
// "major every M", failures that leave the previous checkpoint and `latest` untouched (a throwing
// writer, EFBIG via RLIMIT_FSIZE in a forked child, ENOSPC on a tiny tmpfs when mount is allowed),
// and torn or corrupted checkpoints that make loading fall back to the previous one with a warning.
#include <gtest/gtest.h>
#include <sys/inotify.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <memory>
#include <regex>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;
using test::error_of;
using test::read_file;
using test::write_file;

// Non-zero, non-repeating values (docs/style.md: never test on zeros).
std::vector<float> ramp(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * (1.0f + 0.001f * static_cast<float>(i));
  return v;
}

// A model.safetensors writer through the real atomic SafetensorsWriter; owns its data.
CheckpointFile model_file(size_t n, float scale, const std::string& name = "model.safetensors") {
  auto data = std::make_shared<std::vector<float>>(ramp(n, scale));
  return {name, [data](const std::string& path) {
            SafetensorsWriter w;
            w.add("w", DType::kF32, {static_cast<int64_t>(data->size())}, data->data());
            w.write(path);
          }};
}

CheckpointFile text_file(const std::string& name, const std::string& content) {
  return {name, [content](const std::string& path) { write_file(path, content); }};
}

json state_for(int64_t step) {
  return json{{"step", step},
              {"tokens_seen", step * 4096},
              {"data_cursor", {{"shard", 3}, {"offset", 12345}, {"epoch", 1}}},
              {"rng", {{"seed", 1337}, {"counter", step * 7 + 1}}},
              {"lr", 0.00025}};
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

class CheckpointTest : public ::testing::Test {
 protected:
  std::string step_dir(int64_t step) const { return fmt::format("{}/step_{:09d}", root_, step); }
  std::string latest() const { return read_file(root_ + "/latest"); }

  // Options to save `step` into this test's root with state_for(step); the files are up to the test.
  CheckpointSaveOptions options_for(int64_t step) const {
    CheckpointSaveOptions opt;
    opt.root = root_;
    opt.step = step;
    opt.state = state_for(step);
    return opt;
  }

  // A checkpoint with a model file and a small text file; keep everything unless told.
  std::string save(int64_t step, int keep_last = 0, int64_t keep_every = 0) {
    CheckpointSaveOptions opt = options_for(step);
    opt.files = {model_file(257, static_cast<float>(step) + 0.5f),
                 text_file("notes.txt", fmt::format("step {}\n", step))};
    opt.keep_last = keep_last;
    opt.keep_every = keep_every;
    return save_checkpoint(opt);
  }

  // Names directly under the root, sorted (includes "latest").
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(root_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  std::vector<std::string> step_names() const {
    std::vector<std::string> names;
    for (const auto& n : entries())
      if (n.rfind("step_", 0) == 0) names.push_back(n);
    return names;
  }

  // The previous checkpoint survived a failed save of `failed_step` completely.
  void expect_previous_intact(int64_t previous_step, int64_t failed_step, const std::string& latest_before) {
    EXPECT_EQ(latest(), latest_before);
    EXPECT_FALSE(fs::exists(step_dir(failed_step)));
    EXPECT_FALSE(fs::exists(step_dir(failed_step) + ".tmp"));
    EXPECT_EQ(step_names(), std::vector<std::string>{fmt::format("step_{:09d}", previous_step)});
    EXPECT_EQ(open_checkpoint(step_dir(previous_step)).state, state_for(previous_step));
    std::vector<std::string> warnings;
    const auto found = find_latest_checkpoint(root_, &warnings);
    ASSERT_TRUE(found.has_value());
    EXPECT_EQ(found->step, previous_step);
    EXPECT_TRUE(warnings.empty()) << warnings.front();
  }

  test::TempDir tmp_{"ckpt"};  // a fresh directory per test
  const fs::path dir_ = tmp_.path();
  std::string root_ = (dir_ / "ckpt").string();
};

TEST_F(CheckpointTest, SaveOpenRoundTrip) {
  const std::string dir = save(100);
  EXPECT_EQ(dir, step_dir(100));
  EXPECT_EQ(latest(), "step_000000100\n");
  EXPECT_EQ(entries(), (std::vector<std::string>{"latest", "step_000000100"}));

  const CheckpointInfo info = open_checkpoint(dir);
  EXPECT_EQ(info.dir, dir);
  EXPECT_EQ(info.step, 100);
  EXPECT_EQ(info.state, state_for(100));
  EXPECT_EQ(info.state.dump(), state_for(100).dump());  // key order survives too
  EXPECT_EQ(read_file(dir + "/notes.txt"), "step 100\n");
  const auto model = SafetensorsFile::open(dir + "/model.safetensors");
  std::vector<float> w(257);
  model.read_into("w", Tensor{w.data(), DType::kF32, Device::kCPU, Shape{257}});
  EXPECT_EQ(w, ramp(257, 100.5f));

  // The manifest lists every other file with its size and XXH3-64 (docs/formats.md §4.6).
  const json manifest = json::parse(read_file(dir + "/manifest.json"));
  EXPECT_EQ(manifest["version"], 1);
  EXPECT_EQ(manifest["step"], 100);
  EXPECT_TRUE(
      std::regex_match(manifest["created"].get<std::string>(), std::regex(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")));
  std::vector<std::string> listed;
  for (const auto& f : manifest["files"]) {
    const std::string name = f["name"], path = dir + "/" + name, hash = f["xxh3_64"];
    listed.push_back(name);
    EXPECT_EQ(f["bytes"].get<uint64_t>(), fs::file_size(path)) << name;
    EXPECT_TRUE(std::regex_match(hash, std::regex("[0-9a-f]{16}"))) << hash;
    EXPECT_EQ(hash, xxh3_file_hex(path)) << name;
  }
  EXPECT_EQ(listed, (std::vector<std::string>{"model.safetensors", "notes.txt", "trainer_state.json"}));

  std::vector<std::string> warnings;
  const auto found = find_latest_checkpoint(root_, &warnings);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->step, 100);
  EXPECT_EQ(found->dir, dir);
  EXPECT_TRUE(warnings.empty());
}

TEST_F(CheckpointTest, Xxh3FileHexMatchesOneShotHash) {
  const std::string empty = (dir_ / "empty").string();
  write_file(empty, "");
  EXPECT_EQ(xxh3_file_hex(empty), "2d06800538d394c2");  // XXH3_64bits("", seed 0), the library's test vector

  // Larger than the 1 MiB read chunk and not a multiple of it: streaming == one shot.
  std::string big(3 * (1 << 20) + 12345, '\0');
  uint32_t x = 2463534242u;
  for (auto& c : big) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    c = static_cast<char>(x);
  }
  const std::string path = (dir_ / "big").string();
  write_file(path, big);
  EXPECT_EQ(xxh3_file_hex(path), fmt::format("{:016x}", static_cast<uint64_t>(XXH3_64bits(big.data(), big.size()))));
  EXPECT_TRUE(contains(error_of([&] { xxh3_file_hex(path + ".nope"); }), path + ".nope"));
}

TEST_F(CheckpointTest, KeepLastPrunesOlderCheckpoints) {
  for (int64_t step : {10, 20, 30, 40}) save(step, /*keep_last=*/2);
  EXPECT_EQ(step_names(), (std::vector<std::string>{"step_000000030", "step_000000040"}));
  EXPECT_EQ(latest(), "step_000000040\n");
  // keep_last = 1 keeps only the one just written.
  save(50, 1);
  EXPECT_EQ(step_names(), std::vector<std::string>{"step_000000050"});
}

TEST_F(CheckpointTest, KeepEveryKeepsMajorCheckpointsForever) {
  for (int64_t step : {50, 100, 150, 200, 250, 300}) save(step, /*keep_last=*/2, /*keep_every=*/100);
  EXPECT_EQ(step_names(),
            (std::vector<std::string>{"step_000000100", "step_000000200", "step_000000250", "step_000000300"}));
  save(350, 2, 100);
  EXPECT_EQ(step_names(),
            (std::vector<std::string>{"step_000000100", "step_000000200", "step_000000300", "step_000000350"}));
  // keep_last = 0 keeps everything.
  save(400, 0, 0);
  save(450, 0, 0);
  EXPECT_EQ(step_names().size(), 6u);
}

TEST_F(CheckpointTest, PruningLeavesNewerCheckpointsAlone) {
  // A run resumed from an older checkpoint: the newer ones are not pruned by an older save.
  for (int64_t step : {10, 20, 30}) save(step);
  save(15, /*keep_last=*/1);
  EXPECT_EQ(step_names(), (std::vector<std::string>{"step_000000015", "step_000000020", "step_000000030"}));
  std::vector<std::string> warnings;
  const auto found = find_latest_checkpoint(root_, &warnings);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->step, 15);  // the pointer wins; the newer directories are reported
  ASSERT_EQ(warnings.size(), 2u);
  EXPECT_TRUE(contains(warnings[0], "step_000000030") && contains(warnings[0], "newer")) << warnings[0];
  EXPECT_TRUE(contains(warnings[1], "step_000000020") && contains(warnings[1], "newer")) << warnings[1];
}

TEST_F(CheckpointTest, ManifestIsWrittenLastInsideTheTemporaryDirectory) {
  save(4);
  const std::string tmp = step_dir(5) + ".tmp";
  // inotify reports every create/modify/close-after-write/rename-in inside the temporary directory,
  // in order (the watch follows the directory through its rename): the manifest's first event must
  // come after the last event of every other file. Timestamps alone are too coarse to show this.
  const int events_fd = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  ASSERT_GE(events_fd, 0) << std::strerror(errno);
  int calls = 0;
  auto inspect = [&](const std::string& name) {
    return CheckpointFile{
        name, [&, name](const std::string& path) {
          if (++calls == 1) {
            EXPECT_GE(::inotify_add_watch(events_fd, tmp.c_str(), IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO),
                      0);
          }
          // Writers run inside step_N.tmp, before the state, the manifest, the
          // rename and the pointer update.
          EXPECT_EQ(path, tmp + "/" + name);
          EXPECT_TRUE(fs::is_directory(tmp));
          EXPECT_FALSE(fs::exists(tmp + "/manifest.json"));
          EXPECT_FALSE(fs::exists(tmp + "/trainer_state.json"));
          EXPECT_FALSE(fs::exists(step_dir(5)));
          EXPECT_EQ(latest(), "step_000000004\n");
          write_file(path, "payload of " + name);
        }};
  };
  CheckpointSaveOptions opt = options_for(5);
  opt.files = {inspect("a.bin"), inspect("b.bin"), model_file(100, 5.0f)};
  save_checkpoint(opt);
  EXPECT_EQ(calls, 2);

  std::vector<std::string> events;  // file names, in event order
  alignas(inotify_event) char buf[64 * 1024];
  for (ssize_t n; (n = ::read(events_fd, buf, sizeof buf)) > 0;) {
    for (ssize_t at = 0; at < n;) {
      const auto* ev = reinterpret_cast<const inotify_event*>(buf + at);
      EXPECT_FALSE(ev->mask & IN_Q_OVERFLOW);
      if (ev->len > 0) events.emplace_back(ev->name);
      at += static_cast<ssize_t>(sizeof(inotify_event) + ev->len);
    }
  }
  ::close(events_fd);
  const auto first_manifest = std::find(events.begin(), events.end(), "manifest.json");
  ASSERT_NE(first_manifest, events.end());
  for (const char* name : {"a.bin", "b.bin", "model.safetensors", "trainer_state.json"}) {
    const auto last = std::find(events.rbegin(), events.rend(), name);
    ASSERT_NE(last, events.rend()) << name;
    EXPECT_LT(std::distance(events.begin(), last.base()) - 1, std::distance(events.begin(), first_manifest)) << name;
  }

  // Every other file is at least as old as the manifest (coarse clocks may tie), and all are listed.
  auto mtime_ns = [](const std::string& p) {
    struct stat st {};
    EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
    return static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
  };
  const std::string dir = step_dir(5);
  const int64_t manifest_time = mtime_ns(dir + "/manifest.json");
  std::vector<std::string> on_disk;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name == "manifest.json") continue;
    on_disk.push_back(name);
    EXPECT_LE(mtime_ns(e.path().string()), manifest_time) << name;
  }
  std::sort(on_disk.begin(), on_disk.end());
  std::vector<std::string> listed;
  const json manifest = json::parse(read_file(dir + "/manifest.json"));
  for (const auto& f : manifest["files"]) listed.push_back(f["name"]);
  std::sort(listed.begin(), listed.end());
  EXPECT_EQ(on_disk, listed);
  EXPECT_EQ(latest(), "step_000000005\n");
}

TEST_F(CheckpointTest, ThrowingWriterLeavesPreviousCheckpointAndLatest) {
  save(1);
  const std::string latest_before = latest();
  CheckpointSaveOptions opt = options_for(2);
  opt.files = {model_file(64, 2.0f), {"optimizer.safetensors", [](const std::string& path) {
                                        write_file(path, "half of the optimizer st");  // then dies midway
                                        throw std::runtime_error("simulated failure midway");
                                      }}};
  const std::string msg = error_of([&] { save_checkpoint(opt); });
  EXPECT_TRUE(contains(msg, "simulated failure midway")) << msg;
  EXPECT_TRUE(contains(msg, step_dir(2) + ".tmp/optimizer.safetensors")) << msg;
  EXPECT_TRUE(contains(msg, "step 2 not saved")) << msg;
  expect_previous_intact(1, 2, latest_before);

  // A writer that returns without creating its file is a failure too, naming the path.
  opt.files = {{"model.safetensors", [](const std::string&) {}}};
  const std::string msg2 = error_of([&] { save_checkpoint(opt); });
  EXPECT_TRUE(contains(msg2, step_dir(2) + ".tmp/model.safetensors")) << msg2;
  expect_previous_intact(1, 2, latest_before);

  // The next save works normally.
  opt.files = {model_file(64, 2.0f)};
  save_checkpoint(opt);
  EXPECT_EQ(latest(), "step_000000002\n");
  EXPECT_EQ(open_checkpoint(step_dir(2)).step, 2);
}

TEST_F(CheckpointTest, InvalidOptionsAreRejectedBeforeTouchingTheDisk) {
  save(1);
  auto attempt = [&](std::vector<CheckpointFile> files, int64_t step) {
    CheckpointSaveOptions opt;
    opt.root = root_;
    opt.step = step;
    opt.files = std::move(files);
    return error_of([&] { save_checkpoint(opt); });
  };
  EXPECT_TRUE(contains(attempt({text_file("a", "x"), text_file("a", "y")}, 2), "'a' appears twice"));
  EXPECT_TRUE(contains(attempt({text_file("manifest.json", "x")}, 2), "reserved"));
  EXPECT_TRUE(contains(attempt({text_file("trainer_state.json", "x")}, 2), "reserved"));
  EXPECT_TRUE(contains(attempt({text_file("sub/x", "x")}, 2), "not a plain file name"));
  EXPECT_TRUE(contains(attempt({text_file("..", "x")}, 2), "not a plain file name"));
  // A null writer: another process's file, which must be in the temporary directory by the end.
  EXPECT_TRUE(contains(attempt({CheckpointFile{"w", nullptr}}, 2), "not written (another rank's file)"));
  EXPECT_TRUE(contains(attempt({}, -1), "negative"));
  EXPECT_EQ(entries(), (std::vector<std::string>{"latest", "step_000000001"}));
}

// ---- corrupted and torn checkpoints ----

enum class Damage { kTruncate, kFlipByte, kDeleteFile, kDeleteManifest, kFlipStateByte };

struct DamageCase {
  Damage damage;
  const char* label;
  const char* file;    // the file the error must name
  const char* reason;  // and what it must say
};

class CheckpointDamageTest : public CheckpointTest, public ::testing::WithParamInterface<DamageCase> {};

TEST_P(CheckpointDamageTest, OpenFailsNamingTheFileAndLoadingFallsBack) {
  const DamageCase c = GetParam();
  save(1);
  save(2);
  const std::string dir = step_dir(2);
  const std::string model = dir + "/model.safetensors";
  switch (c.damage) {
    case Damage::kTruncate: fs::resize_file(model, fs::file_size(model) - 5); break;
    case Damage::kFlipByte: {
      std::string bytes = read_file(model);
      bytes[bytes.size() - 3] ^= 0x01;  // a single bit inside the tensor data
      write_file(model, bytes);
      break;
    }
    case Damage::kDeleteFile: fs::remove(model); break;
    case Damage::kDeleteManifest: fs::remove(dir + "/manifest.json"); break;
    case Damage::kFlipStateByte: {
      std::string bytes = read_file(dir + "/trainer_state.json");
      bytes[bytes.find("4096") + 1] ^= 0x01;  // still valid JSON, different number
      write_file(dir + "/trainer_state.json", bytes);
      break;
    }
  }
  const std::string expected_file = std::string("step_000000002/") + c.file;
  const std::string msg = error_of([&] { open_checkpoint(dir); });
  EXPECT_TRUE(contains(msg, expected_file)) << msg;
  EXPECT_TRUE(contains(msg, c.reason)) << msg;

  std::vector<std::string> warnings;
  const auto found = find_latest_checkpoint(root_, &warnings);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->step, 1);
  EXPECT_EQ(found->state, state_for(1));
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_TRUE(contains(warnings[0], expected_file)) << warnings[0];
  EXPECT_TRUE(contains(warnings[0], c.reason)) << warnings[0];

  // The same fallback when the pointer is gone and the directories are scanned.
  fs::remove(root_ + "/latest");
  warnings.clear();
  const auto scanned = find_latest_checkpoint(root_, &warnings);
  ASSERT_TRUE(scanned.has_value());
  EXPECT_EQ(scanned->step, 1);
  ASSERT_EQ(warnings.size(), 2u);
  EXPECT_TRUE(contains(warnings[0], "latest: missing")) << warnings[0];
  EXPECT_TRUE(contains(warnings[1], expected_file)) << warnings[1];

  // An explicit resume from the damaged directory fails instead of falling back.
  EXPECT_TRUE(contains(error_of([&] { resolve_resume(dir, root_); }), expected_file));
}

INSTANTIATE_TEST_SUITE_P(
    Damages, CheckpointDamageTest,
    ::testing::Values(DamageCase{Damage::kTruncate, "Truncated", "model.safetensors", "truncated?"},
                      DamageCase{Damage::kFlipByte, "FlippedByte", "model.safetensors", "(corrupted)"},
                      DamageCase{Damage::kDeleteFile, "DeletedFile", "model.safetensors", "missing"},
                      DamageCase{Damage::kDeleteManifest, "MissingManifest", "manifest.json", "missing"},
                      DamageCase{Damage::kFlipStateByte, "FlippedStateByte", "trainer_state.json", "(corrupted)"}),
    [](const ::testing::TestParamInfo<DamageCase>& info) { return std::string(info.param.label); });

TEST_F(CheckpointTest, LatestPointerMissingOrBrokenFallsBackToTheNewestValid) {
  save(1);
  save(2);
  // Pointer missing: scan, newest first.
  fs::remove(root_ + "/latest");
  std::vector<std::string> warnings;
  auto found = find_latest_checkpoint(root_, &warnings);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->step, 2);
  ASSERT_EQ(warnings.size(), 1u);

  // Pointer naming a directory that does not exist.
  write_file(root_ + "/latest", "step_000000009\n");
  warnings.clear();
  found = find_latest_checkpoint(root_, &warnings);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->step, 2);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_TRUE(contains(warnings[0], "step_000000009")) << warnings[0];

  // Pointer holding garbage.
  write_file(root_ + "/latest", "../../etc\n");
  warnings.clear();
  found = find_latest_checkpoint(root_, &warnings);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->step, 2);
  EXPECT_EQ(warnings.size(), 1u);
}

TEST_F(CheckpointTest, NoCheckpointGivesNullopt) {
  std::vector<std::string> warnings;
  EXPECT_FALSE(find_latest_checkpoint(root_, &warnings).has_value());  // no root at all
  fs::create_directories(root_);
  EXPECT_FALSE(find_latest_checkpoint(root_, &warnings).has_value());  // empty root
  EXPECT_TRUE(warnings.empty());
  save(3);
  fs::remove(step_dir(3) + "/notes.txt");
  EXPECT_FALSE(find_latest_checkpoint(root_, &warnings).has_value());  // the only one is broken
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_TRUE(contains(warnings[0], "notes.txt")) << warnings[0];
}

TEST_F(CheckpointTest, StaleTemporaryDirectoriesAreIgnoredAndCleanedOnTheNextSave) {
  save(1);
  // A crashed save of step 2 and of a later step 7, with files that look like a checkpoint.
  for (int64_t step : {2, 7}) {
    const std::string tmp = step_dir(step) + ".tmp";
    fs::create_directories(tmp);
    write_file(tmp + "/model.safetensors", "partial");
    write_file(tmp + "/manifest.json", R"({"version":1,"step":)" + std::to_string(step) + R"(,"files":[]})");
  }
  write_file(root_ + "/latest.tmp.12345", "step_000000007\n");  // a crashed pointer update
  std::vector<std::string> warnings;
  const auto found = find_latest_checkpoint(root_, &warnings);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->step, 1);
  EXPECT_TRUE(warnings.empty()) << warnings.front();

  save(2);
  EXPECT_EQ(entries(), (std::vector<std::string>{"latest", "step_000000001", "step_000000002"}));
  EXPECT_EQ(open_checkpoint(step_dir(2)).state, state_for(2));
}

TEST_F(CheckpointTest, SavingTheSameStepAgainReplacesIt) {
  save(5);
  CheckpointSaveOptions opt;
  opt.root = root_;
  opt.step = 5;
  opt.files = {text_file("notes.txt", "second version\n")};
  opt.state = json{{"step", 5}, {"version", "second"}};
  save_checkpoint(opt);
  const CheckpointInfo info = open_checkpoint(step_dir(5));
  EXPECT_EQ(info.state["version"], "second");
  EXPECT_EQ(read_file(step_dir(5) + "/notes.txt"), "second version\n");
  EXPECT_FALSE(fs::exists(step_dir(5) + "/model.safetensors"));  // nothing of the old copy remains
  EXPECT_EQ(entries(), (std::vector<std::string>{"latest", "step_000000005"}));
}

TEST_F(CheckpointTest, FailedPointerUpdateUndoesTheRename) {
  save(1);
  save(2);
  // Something in the way of `latest` (here a non-empty directory) makes its rename fail after the
  // step directory was already renamed into place: the save must be undone, old copies kept.
  fs::remove(root_ + "/latest");
  fs::create_directories(root_ + "/latest/blocker");
  const std::string msg = error_of([&] { save(3); });
  EXPECT_TRUE(contains(msg, root_ + "/latest")) << msg;
  EXPECT_TRUE(contains(msg, "step 3 not saved")) << msg;
  EXPECT_FALSE(fs::exists(step_dir(3)));
  EXPECT_FALSE(fs::exists(step_dir(3) + ".tmp"));
  // Re-saving an existing step swaps directories; the failure swaps them back.
  CheckpointSaveOptions opt;
  opt.root = root_;
  opt.step = 2;
  opt.files = {text_file("notes.txt", "replacement\n")};
  EXPECT_TRUE(contains(error_of([&] { save_checkpoint(opt); }), "step 2 not saved"));
  EXPECT_EQ(read_file(step_dir(2) + "/notes.txt"), "step 2\n");
  EXPECT_EQ(open_checkpoint(step_dir(2)).state, state_for(2));
  EXPECT_EQ(step_names(), (std::vector<std::string>{"step_000000001", "step_000000002"}));
  EXPECT_TRUE(fs::is_directory(root_ + "/latest/blocker"));
}

TEST_F(CheckpointTest, ResolveResume) {
  save(1);
  save(2);
  EXPECT_EQ(resolve_resume("", root_)->step, 2);
  EXPECT_EQ(resolve_resume("latest", root_)->step, 2);
  EXPECT_EQ(resolve_resume(step_dir(1), root_)->step, 1);
  EXPECT_EQ(resolve_resume("step_000000001", root_)->step, 1);  // relative to the root
  EXPECT_TRUE(contains(error_of([&] { resolve_resume("step_000000042", root_); }), "step_000000042"));
  EXPECT_FALSE(resolve_resume("latest", (dir_ / "elsewhere").string()).has_value());
}

// `--resume run/checkpoints`: a root (as eval and generate accept) resumes from its latest.
TEST_F(CheckpointTest, ResolveResumeAcceptsACheckpointRoot) {
  save(1);
  save(2);
  const std::string configured = (dir_ / "configured").string();  // checkpoint.dir of the run
  EXPECT_EQ(resolve_resume(root_, configured)->step, 2);
  // No pointer: the step directories are scanned, and why is passed on.
  fs::remove(root_ + "/latest");
  std::vector<std::string> warnings;
  const auto scanned = resolve_resume(root_, configured, &warnings);
  ASSERT_TRUE(scanned.has_value());
  EXPECT_EQ(scanned->step, 2);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_TRUE(contains(warnings[0], "latest: missing")) << warnings[0];
  // A root where nothing verifies is an error naming the root and the reasons, not a fresh start.
  fs::remove(step_dir(1) + "/notes.txt");
  fs::remove(step_dir(2) + "/notes.txt");
  const std::string msg = error_of([&] { resolve_resume(root_, configured); });
  EXPECT_TRUE(contains(msg, root_ + ": no valid checkpoint")) << msg;
  EXPECT_TRUE(contains(msg, "notes.txt")) << msg;
  // A directory with neither manifest.json nor step_* is still opened as one checkpoint.
  fs::create_directories(dir_ / "empty");
  EXPECT_TRUE(contains(error_of([&] { resolve_resume((dir_ / "empty").string(), configured); }), "manifest.json"));
}

TEST_F(CheckpointTest, AtomicWriteTextAndFsyncPath) {
  const std::string p = (dir_ / "pointer").string();
  atomic_write_text(p, "one\n");
  atomic_write_text(p, "two\n");
  EXPECT_EQ(read_file(p), "two\n");
  // A directory in the way: the rename fails, the error names the path, no temporary remains.
  const std::string blocked = (dir_ / "blocked").string();
  fs::create_directories(blocked + "/inside");
  const std::string msg = error_of([&] { atomic_write_text(blocked, "x"); });
  EXPECT_TRUE(contains(msg, blocked)) << msg;
  for (const auto& e : fs::directory_iterator(dir_))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
  const std::string missing = (dir_ / "no" / "such").string();
  const std::string msg2 = error_of([&] { fsync_path(missing); });
  EXPECT_TRUE(contains(msg2, missing) && contains(msg2, std::strerror(ENOENT))) << msg2;
}

// ---- disk full ----

// Runs a save of step 2 in a forked child whose files may not grow beyond `limit` bytes
// (RLIMIT_FSIZE: write() fails with EFBIG once SIGXFSZ is ignored). Returns the child's error text.
std::string save_in_child_with_file_size_limit(const CheckpointSaveOptions& opt, rlim_t limit) {
  int fds[2];
  if (::pipe(fds) != 0) return "pipe failed";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    std::signal(SIGXFSZ, SIG_IGN);
    rlimit lim{};
    ::getrlimit(RLIMIT_FSIZE, &lim);
    lim.rlim_cur = limit;
    std::string msg = "setrlimit failed";
    int code = 2;
    if (::setrlimit(RLIMIT_FSIZE, &lim) == 0) {
      try {
        save_checkpoint(opt);
        msg = "no error";
        code = 3;
      } catch (const Error& e) {
        msg = e.what();
        code = 0;
      }
    }
    [[maybe_unused]] const ssize_t w = ::write(fds[1], msg.data(), msg.size());
    ::_exit(code);  // no gtest teardown, no atexit handlers in the child
  }
  ::close(fds[1]);
  std::string msg;
  char buf[4096];
  for (ssize_t r; (r = ::read(fds[0], buf, sizeof buf)) > 0;) msg.append(buf, static_cast<size_t>(r));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status << ": " << msg;
  return msg;
}

TEST_F(CheckpointTest, DiskFullViaFileSizeLimitInAWriter) {
  save(1);
  const std::string latest_before = latest();
  CheckpointSaveOptions opt = options_for(2);
  opt.files = {model_file(64 * 1024, 2.0f)};  // 256 KiB of tensor data > the 64 KiB limit
  const std::string msg = save_in_child_with_file_size_limit(opt, 64 * 1024);
  EXPECT_TRUE(contains(msg, step_dir(2) + ".tmp/model.safetensors")) << msg;
  EXPECT_TRUE(contains(msg, std::strerror(EFBIG))) << msg;
  EXPECT_TRUE(contains(msg, "step 2 not saved")) << msg;
  expect_previous_intact(1, 2, latest_before);
}

TEST_F(CheckpointTest, DiskFullViaFileSizeLimitInTrainerState) {
  save(1);
  const std::string latest_before = latest();
  CheckpointSaveOptions opt = options_for(2);
  opt.state["outlier_window"] = ramp(20000, 1.0f);  // a few hundred KiB of JSON > the limit
  opt.files = {text_file("notes.txt", "small\n")};
  const std::string msg = save_in_child_with_file_size_limit(opt, 64 * 1024);
  EXPECT_TRUE(contains(msg, step_dir(2) + ".tmp/trainer_state.json: write failed")) << msg;
  EXPECT_TRUE(contains(msg, std::strerror(EFBIG))) << msg;
  expect_previous_intact(1, 2, latest_before);
}

// ENOSPC from a real (tiny) file system; needs root and permission to mount, skipped otherwise.
TEST_F(CheckpointTest, DiskFullOnATinyTmpfs) {
  if (::geteuid() != 0) GTEST_SKIP() << "mounting a tmpfs needs root";
  const std::string mnt = (dir_ / "tiny").string();
  fs::create_directories(mnt);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=512k") != 0)
    GTEST_SKIP() << "mount of a tmpfs not permitted: " << std::strerror(errno);
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mnt};
  root_ = mnt + "/ckpt";
  save(1);
  const std::string latest_before = latest();
  CheckpointSaveOptions opt = options_for(2);
  opt.files = {model_file(256 * 1024, 2.0f)};  // 1 MiB > the 512 KiB file system
  const std::string msg = error_of([&] { save_checkpoint(opt); });
  EXPECT_TRUE(contains(msg, step_dir(2) + ".tmp/model.safetensors")) << msg;
  EXPECT_TRUE(contains(msg, std::strerror(ENOSPC))) << msg;
  expect_previous_intact(1, 2, latest_before);
}

}  // namespace
}  // namespace diffmoe
