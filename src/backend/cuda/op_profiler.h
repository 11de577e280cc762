// Op-level profile of a backend (DIFFMOE_CUDA_PROFILE=1): the interface a program such as
// bench/step_bench.cpp reaches through dynamic_cast on its Backend, so it needs no CUDA headers
// (this file includes none) and does nothing on a backend that does not profile.
#pragma once

namespace diffmoe {

class OpProfiler {
 public:
  virtual ~OpProfiler() = default;
  virtual bool profiling() const = 0;
  // Waits for the device, then prints op, calls, total ms and % of the summed op time, the slowest
  // op first, to stdout; the table is printed again at the backend's destruction if anything was
  // recorded after the last print.
  virtual void print_profile() = 0;
  virtual void reset_profile() = 0;  // forget what was recorded (e.g. the warm-up steps)
};

}  // namespace diffmoe
