// The op case table: every family's cases in one fixed order (op_case.h).
#include "op_case.h"

namespace diffmoe::opcases {

const std::vector<OpCase>& op_cases() {
  static const std::vector<OpCase> table = [] {
    std::vector<OpCase> all;
    for (auto family : {norm_gemm_cases, elementwise_cases, attention_cases, moe_cases})
      for (OpCase& c : family()) all.push_back(std::move(c));
    return all;
  }();
  return table;
}

}  // namespace diffmoe::opcases
