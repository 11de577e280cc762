#include "model/recompute.h"

#include <fmt/format.h>

#include "core/error.h"

namespace diffmoe {

Recompute parse_recompute(std::string_view s, std::string_view key) {
  if (s == "none") return Recompute::kNone;
  if (s == "attention") return Recompute::kAttention;
  if (s == "moe") return Recompute::kMoe;
  if (s == "full") return Recompute::kFull;
  DIFFMOE_FAIL("{}: expected none, attention, moe or full, got '{}'", key, s);
}

std::string_view recompute_name(Recompute r) {
  switch (r) {
    case Recompute::kNone: return "none";
    case Recompute::kAttention: return "attention";
    case Recompute::kMoe: return "moe";
    case Recompute::kFull: return "full";
  }
  return "?";
}

std::string ActNames::name(std::string_view n, bool recomputed) const {
  return recomputed ? fmt::format("act.recomputed.{}.{}", block_, n) : fmt::format("act.{}.{}.{}", layer_, block_, n);
}

void ActNames::plan(PrecisionPlan& pl, Arena& acts, std::string_view n, const Shape& shape, ActRole role,
                    bool recomputed) const {
  const std::string full = name(n, recomputed);
  if (!recomputed || !acts.has(full)) {
    pl.add(acts, full, shape, role);
    return;
  }
  for (const Arena::Entry& e : acts.entries()) {
    if (e.name != full) continue;
    DIFFMOE_CHECK(e.shape == shape && e.dtype == pl.dtype(role),
                  "[model] layer {}: the shared view {} is {} {}, this layer needs {} {}", layer_, full, e.shape.str(),
                  dtype_name(e.dtype), shape.str(), dtype_name(pl.dtype(role)));
  }
}

}  // namespace diffmoe
