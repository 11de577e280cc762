// The safetensors reader (io/safetensors.h): header size, JSON header, dtypes, shapes, offsets.
// Every tensor it accepts is read whole, so an accepted offset outside the file is a finding.
#include "core/error.h"
#include "fuzz_util.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const diffmoe::fuzz::MemFile file(diffmoe::fuzz::as_text(data, size));
  try {
    const diffmoe::SafetensorsFile f = diffmoe::SafetensorsFile::open(file.path());
    unsigned sum = 0;
    for (const auto& name : f.names()) {
      const diffmoe::SafetensorsEntry& e = f.get(name);
      const auto* p = static_cast<const unsigned char*>(e.data);
      for (size_t i = 0; i < e.nbytes; ++i) sum += p[i];
    }
    for (const auto& [k, v] : f.metadata()) sum += static_cast<unsigned>(k.size() + v.size());
    volatile unsigned sink = sum;
    (void)sink;
  } catch (const diffmoe::Error&) {
  }
  return 0;
}
