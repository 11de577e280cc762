// The training state of a checkpoint as shards that do not depend on how it was split
// (docs/formats.md §4.2): every rank writes one safetensors file with the 1-D slices it owns,
//   "master/<param>/<first>"  f32 masters (the parameters), elements [first, first + n) of the
//   "m/<param>/<first>"       global tensor in row-major order, and the Adam moments of the same
//   "v/<param>/<first>"       elements (in optim.moment_dtype: f32, or bf16);
//   "buffer/<param>/0"        the balancing biases, whole (rank 0 only),
// with the model config and the world layout in the metadata. A reader assembles any element range
// of any parameter from whichever slices cover it, so a checkpoint written by N ranks with EP degree
// e loads into M ranks with EP degree f (ZeRO-1 chunks and expert ranges are just element ranges).
// A directory holding a whole-model "model.safetensors" (docs/model.md §8 names, e.g. an export) reads as
// masters without moments.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/config.h"
#include "train/optimizer.h"

namespace diffmoe {

// "shard-00003-of-00008.safetensors"
std::string shard_file_name(int64_t rank, int64_t world);

// Writes this rank's slices (masters, moments; the buffers too when with_buffers) to `path`, with
// metadata {"config": model config JSON, "rank", "world", "ep", "step"}.
void write_state_shard(const AdamW& opt, const std::string& path, int64_t rank, int64_t world, bool with_buffers,
                       const std::map<std::string, std::string>& extra_metadata = {});

class StateReader {
 public:
  enum class Kind { kMaster, kMoment1, kMoment2, kBuffer };
  // Opens every shard-*.safetensors in dir, or else dir/model.safetensors (+ a legacy
  // optimizer.safetensors with "m.<name>" / "v.<name>" tensors). Errors name the file.
  explicit StateReader(const std::string& dir);

  const ModelConfig& config() const { return config_; }
  const std::string& dir() const { return dir_; }
  bool has_moments() const { return has_moments_; }
  // The dtype of the moments (every moment slice has the same: an error names the file otherwise);
  // meaningful only with has_moments().
  DType moment_dtype() const { return moment_dtype_; }
  // Elements [first, first + count) of `param` (global row-major order) into out. Every element must
  // be covered by a slice of that kind: an error names the parameter and the first missing element.
  void read(Kind kind, const std::string& param, int64_t first, int64_t count, double* out) const;
  // The global element count of `param` as the checkpoint records it (from its config).
  int64_t numel(const std::string& param) const;

 private:
  struct Slice {
    int64_t first = 0, count = 0;
    size_t file = 0;
    std::string tensor;
  };
  std::vector<SafetensorsFile> files_;
  std::map<std::pair<int, std::string>, std::vector<Slice>> slices_;  // (kind, param) -> slices by first
  std::map<std::string, int64_t> numel_;
  ModelConfig config_;
  bool has_moments_ = false;
  DType moment_dtype_ = DType::kF32;
  std::string dir_;
};

// Loads masters and moments (when the reader has them; else zero moments) of this rank's pieces,
// the buffers into the model, and writes the compute weights of the owned chunks from the masters.
// The caller all-gathers the chunks to the other data-parallel ranks. Moments saved in another
// dtype than the optimizer's (optim.moment_dtype changed) are converted: f32 to bf16 rounds to
// nearest even, bf16 to f32 is exact.
void load_state(AdamW& opt, const StateReader& reader, Context ctx);
// The notice to print when load_state converts the moments (their dtype in the checkpoint differs
// from the optimizer's), or nothing.
std::optional<std::string> moment_dtype_change(const AdamW& opt, const StateReader& reader);
// Writes the whole model as one safetensors file with the docs/model.md §8 names (the f32 masters and the
// buffers; "config" and the given metadata), loadable by PyTorch and by load_model.
void export_model(const StateReader& reader, const std::string& path,
                  const std::map<std::string, std::string>& metadata = {});
// Loads every parameter of `model` (this rank's part) from the reader's masters and buffers, rounded
// to the compute dtype: evaluation and generation, no optimizer.
void load_model_weights(Model& model, const StateReader& reader);

}  // namespace diffmoe
