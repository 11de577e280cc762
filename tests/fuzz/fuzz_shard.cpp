// Token shard files (data/token_shard.h): header fields, sizes, the checksum, and reading every
// token (each id must be below the shard's vocab_size, or the read is an Error).
#include "core/error.h"
#include "data/token_shard.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const diffmoe::fuzz::MemFile file(diffmoe::fuzz::as_text(data, size));
  for (const bool verify : {true, false}) {
    try {
      const diffmoe::data::Shard s(file.path(), diffmoe::data::ShardOpenOptions{.verify_checksum = verify});
      const std::vector<int32_t> ids = s.read_all();
      for (int32_t id : ids)
        if (id < 0 || static_cast<uint32_t>(id) >= s.header().vocab_size)
          diffmoe::fuzz::finding("read_all returned an id outside vocab_size");
    } catch (const diffmoe::Error&) {
    }
  }
  return 0;
}
