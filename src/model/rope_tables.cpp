// SCAFFOLD: replaced by the real implementation.
#include "model/rope_tables.h"
#include "core/error.h"
namespace diffmoe {
std::vector<double> rope_frequencies(const RopeParams&) { DIFFMOE_FAIL("[rope] not implemented"); }
void rope_tables(const RopeParams&, int64_t, std::vector<double>&, std::vector<double>&) { DIFFMOE_FAIL("[rope] not implemented"); }
double yarn_softmax_scale_factor(const RopeParams&) { DIFFMOE_FAIL("[rope] not implemented"); }
}  // namespace diffmoe
