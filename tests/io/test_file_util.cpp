// The bounded reader of small files, the output-path check and the run lock (io/file_util.h,
// io/run_lock.h): caps, file kinds (FIFO, device, directory), a second holder of a lock.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <string>

#include "core/error.h"
#include "io/file_util.h"
#include "io/run_lock.h"
#include "io_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

namespace fs = std::filesystem;
using test::error_of;

TEST(ReadSmallFile, ReadsRegularFilesUpToTheCap) {
  const test::TempDir tmp("small");
  const std::string p = (tmp.path() / "f.txt").string();
  test::write_file(p, "hello\nworld\n");
  EXPECT_EQ(io::read_small_file(p, 12, "note"), "hello\nworld\n");  // exactly at the cap
  EXPECT_EQ(error_of([&] { io::read_small_file(p, 11, "note"); }),
            p + ": the note is 12 bytes, over the 11-byte limit");
  test::write_file(p, "");
  EXPECT_EQ(io::read_small_file(p, 0, "note"), "");
  const std::string missing = (tmp.path() / "missing").string();
  EXPECT_EQ(error_of([&] { io::read_small_file(missing, 10, "note"); }).rfind(missing + ": cannot open the note (", 0),
            0u);
}

TEST(ReadSmallFile, RefusesWhatIsNotARegularFileWithoutBlocking) {
  const test::TempDir tmp("small");
  const std::string fifo = (tmp.path() / "fifo").string();
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  // No writer: a blocking open would wait forever; the error must come at once.
  EXPECT_EQ(error_of([&] { io::read_small_file(fifo, 100, "pointer"); }),
            fifo + ": the pointer is a FIFO, not a regular file");
  EXPECT_EQ(error_of([&] { io::read_small_file("/dev/zero", 100, "manifest"); }),
            "/dev/zero: the manifest is a character device, not a regular file");
  EXPECT_EQ(error_of([&] { io::read_small_file(tmp.path().string(), 100, "config"); }),
            tmp.path().string() + ": the config is a directory, not a regular file");
  // A regular file that grows past the cap while being read (/proc files report size 0).
  const std::string grows = "/proc/self/maps";
  if (fs::exists(grows)) {
    EXPECT_NE(error_of([&] { io::read_small_file(grows, 10, "map"); }).find("limit"), std::string::npos);
  }
}

TEST(CheckOutputPath, OnlyMissingPathsOrTheExpectedKind) {
  const test::TempDir tmp("out");
  const std::string file = (tmp.path() / "f").string(), fifo = (tmp.path() / "p").string(), dir = tmp.path().string();
  test::write_file(file, "x");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  EXPECT_NO_THROW(io::check_output_path((tmp.path() / "new").string(), "output"));
  EXPECT_NO_THROW(io::check_output_path(file, "output"));
  EXPECT_NO_THROW(io::check_output_path(dir, "output dir", io::OutputKind::kDirectory));
  EXPECT_EQ(error_of([&] { io::check_output_path(fifo, "output"); }),
            fifo + ": the output exists and is a FIFO; expected a regular file (or nothing there yet)");
  EXPECT_EQ(error_of([&] { io::check_output_path("/dev/null", "output"); }),
            "/dev/null: the output exists and is a character device; expected a regular file (or nothing there yet)");
  EXPECT_EQ(error_of([&] { io::check_output_path(dir, "output"); }),
            dir + ": the output exists and is a directory; expected a regular file (or nothing there yet)");
  EXPECT_EQ(error_of([&] { io::check_output_path(file, "shards", io::OutputKind::kDirectory); }),
            file + ": the shards exists and is a regular file; expected a directory (or nothing there yet)");
}

TEST(RunLock, ASecondHolderIsRefusedNamingTheFirst) {
  const test::TempDir tmp("lock");
  const std::string run = (tmp.path() / "run").string();
  {
    const RunLock first(run_dir_lock_path(run), run);
    // flock locks belong to open files: a second open in the same process conflicts like another process.
    const std::string err = error_of([&] { RunLock second(run_dir_lock_path(run), run); });
    EXPECT_EQ(
        err.rfind(run + ": in use by another diffmoe process (pid " + std::to_string(::getpid()) + " on host ", 0), 0u)
        << err;
    EXPECT_NE(err.find(run_dir_lock_path(run)), std::string::npos) << err;
  }
  EXPECT_NO_THROW(RunLock again(run_dir_lock_path(run), run)) << "released with its holder";
  EXPECT_EQ(run_dir_lock_path("runs/x"), "runs/x/train.lock");
  EXPECT_EQ(sibling_lock_path("runs/x/checkpoints"), "runs/x/checkpoints.lock");
  EXPECT_EQ(sibling_lock_path("runs/x/checkpoints/"), "runs/x/checkpoints.lock");
  EXPECT_EQ(sibling_lock_path("."), "./dir.lock");
}

}  // namespace
}  // namespace diffmoe
