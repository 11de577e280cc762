// CUDA graphs for the CUDA backend (Backend::begin_capture … replay; cuda_backend.h's rules, docs/serving.md "CUDA
// graphs"): ops are recorded by stream capture on a backend-owned stream, instantiated once, and launched as one graph.
#include <cuda_runtime_api.h>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"

namespace diffmoe {

namespace {

// An instantiated graph; the template graph is destroyed once instantiated (the executable one is independent).
class CudaGraph final : public CapturedOps {
 public:
  explicit CudaGraph(cudaGraphExec_t exec) : exec_(exec) {}
  ~CudaGraph() override { (void)cudaGraphExecDestroy(exec_); }  // a destructor's path: never throws
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;
  cudaGraphExec_t exec() const { return exec_; }

 private:
  cudaGraphExec_t exec_;
};

}  // namespace

bool CudaBackend::supports_graphs() const { return !profiling_ && !grouped_gemm_reads_offsets(); }

Context CudaBackend::begin_capture(Context) {
  DIFFMOE_CHECK(supports_graphs(),
                "[cuda] ops cannot be recorded now: graphs need the bf16 GEMM mode with the device-scheduled grouped "
                "kernels and no DIFFMOE_CUDA_PROFILE");
  // Non-blocking: work other threads put on the legacy default stream does not join the recording.
  if (capture_stream_ == nullptr) CUDA_CHECK(cudaStreamCreateWithFlags(&capture_stream_, cudaStreamNonBlocking));
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(capture_stream_, &status));
  DIFFMOE_CHECK(status == cudaStreamCaptureStatusNone, "[cuda] begin_capture while a recording is open");
  // Thread-local: this thread's calls that may wait for the device or allocate fail the recording (and throw, through
  // their checks) rather than run outside it; other threads are not restricted.
  CUDA_CHECK(cudaStreamBeginCapture(capture_stream_, cudaStreamCaptureModeThreadLocal));
  return Context{.stream = capture_stream_};
}

std::unique_ptr<CapturedOps> CudaBackend::end_capture(Context capture) {
  DIFFMOE_CHECK(capture_stream_ != nullptr && stream(capture) == capture_stream_,
                "[cuda] end_capture on a context begin_capture did not return");
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamEndCapture(capture_stream_, &graph));
  DIFFMOE_CHECK(graph != nullptr, "[cuda] cudaStreamEndCapture returned no graph");
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  const cudaError_t destroyed = cudaGraphDestroy(graph);
  if (inst != cudaSuccess) cuda_fail("cudaGraphInstantiate(&exec, graph, 0)", __FILE__, __LINE__, inst);
  auto out = std::make_unique<CudaGraph>(exec);
  if (destroyed != cudaSuccess) cuda_fail("cudaGraphDestroy(graph)", __FILE__, __LINE__, destroyed);
  return out;
}

void CudaBackend::abort_capture(Context capture) noexcept {
  if (capture_stream_ == nullptr || stream(capture) != capture_stream_) return;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(capture_stream_, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
    cudaGraph_t graph = nullptr;
    // Invalidated recordings end with an error and no graph; either way nothing is kept.
    if (cudaStreamEndCapture(capture_stream_, &graph) == cudaSuccess && graph != nullptr) (void)cudaGraphDestroy(graph);
  }
  (void)cudaGetLastError();  // capture errors are not sticky: clear them so the next launch check does not see them
}

void CudaBackend::replay(Context ctx, const CapturedOps& ops) {
  const auto* g = dynamic_cast<const CudaGraph*>(&ops);
  DIFFMOE_CHECK(g != nullptr, "[cuda] replay of ops another backend recorded");
  CUDA_CHECK(cudaGraphLaunch(g->exec(), stream(ctx)));
}

}  // namespace diffmoe
