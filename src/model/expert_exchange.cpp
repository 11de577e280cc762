#include "model/expert_exchange.h"

namespace diffmoe {

int64_t RowBlocks::total() const {
  int64_t t = 0;
  for (int64_t c : counts) t += c;
  return t;
}

RowBlocks RowBlocks::from_counts(std::vector<int64_t> counts) {
  RowBlocks b;
  b.offsets.resize(counts.size());
  int64_t off = 0;
  for (size_t p = 0; p < counts.size(); ++p) {
    b.offsets[p] = off;
    off += counts[p];
  }
  b.counts = std::move(counts);
  return b;
}

}  // namespace diffmoe
