// A model config's RoPE parameters and its cos/sin tables on a backend (docs/model.md §3: YaRN folded
// into the frequencies). The training model, the generator and the serving engine each hold a copy
// of the tables sized to their context; all three fill it here, so they cannot drift apart.
#pragma once
#include <cstdint>

#include "backend/backend.h"
#include "model/config.h"
#include "model/rope_tables.h"

namespace diffmoe {

// The RopeParams of `c`'s rope keys.
RopeParams rope_params(const ModelConfig& c);

// Computes the tables for positions [0, max_pos) in f64 and uploads them into `cos` and `sin`
// ([max_pos, rope_dim/2], f64 or f32; f32 tables are the f64 values rounded once).
void upload_rope_tables(Backend& be, const ModelConfig& c, int64_t max_pos, const Tensor& cos, const Tensor& sin);

}  // namespace diffmoe
