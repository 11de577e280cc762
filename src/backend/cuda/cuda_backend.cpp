// CudaBackend glue: device selection, the cuBLAS and cuBLASLt (lt_gemm.h) handles and workspaces,
// host transfers, and the device-side index checks' report (device_issue.h). The ops live in the
// .cu files.
#include "backend/cuda/cuda_backend.h"

#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string_view>

#include "backend/cuda/cuda_check.h"
#include "backend/op_validation.h"

namespace diffmoe {

namespace {

// cuBLAS's recommended workspace on Hopper (cublasSetWorkspace docs): 32 MiB.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

struct SiteText {
  std::string_view op, field;
  bool allows_ignore;          // −1 is valid (cross-entropy targets, unused MoE slots)
  bool group_offsets = false;  // grouped-GEMM offsets: a monotonicity rule, not a range
};

SiteText site_text(IssueSite s) {
  switch (s) {
    case IssueSite::kEmbeddingFwdTokens: return {"embedding_fwd", "tokens", false};
    case IssueSite::kEmbeddingBwdTokens: return {"embedding_bwd", "tokens", false};
    case IssueSite::kRouterBwdTopkIdx: return {"router_bwd", "topk_idx", false};
    case IssueSite::kPermuteTopkIdx: return {"moe_permute", "topk_idx", true};
    case IssueSite::kGatherSrcRow: return {"moe_gather", "src_row", false};
    case IssueSite::kGatherBwdSlotPos: return {"moe_gather_bwd", "slot_pos", true};
    case IssueSite::kCombineFwdSlotPos: return {"moe_combine_fwd", "slot_pos", true};
    case IssueSite::kCombineBwdSlotPos: return {"moe_combine_bwd", "slot_pos", true};
    case IssueSite::kEpPlanTopkIdx: return {"ep_dispatch_plan", "topk_idx", false};
    case IssueSite::kCrossEntropyFwdTargets: return {"cross_entropy_fwd", "targets", true};
    case IssueSite::kCrossEntropyBwdTargets: return {"cross_entropy_bwd", "targets", true};
    case IssueSite::kGroupedGemmOffsets: return {"grouped_gemm", "offsets", false, true};
    case IssueSite::kGroupedGemmMaxRows: return {"grouped_gemm", "offsets", false};
    case IssueSite::kGroupedGemmWgradOffsets: return {"grouped_gemm_wgrad", "offsets", false, true};
    case IssueSite::kFp8GroupedGemmOffsets: return {"fp8_grouped_gemm", "offsets", false, true};
    case IssueSite::kFp8GroupedGemmWgradOffsets: return {"fp8_grouped_gemm_wgrad", "offsets", false, true};
    case IssueSite::kActQuantOffsets: return {"act_quant", "offsets", false, true};
    case IssueSite::kRopePositions: return {"rope", "positions", false};
    case IssueSite::kPagedCacheWriteSlots: return {"paged_cache_write", "slots", false};
    case IssueSite::kPagedAttentionBlockTable: return {"paged_latent_attention", "block_table", false};
    case IssueSite::kPagedAttentionKvLens: return {"paged_latent_attention", "kv_lens", false};
    case IssueSite::kPagedAttentionQOffsets: return {"paged_latent_attention", "q_offsets", false, true};
    case IssueSite::kNone: break;
  }
  return {"cuda", "index", false};
}

}  // namespace

std::string cuda_unusable_reason() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count > 0) return {};
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky: clear it, a later call must not see it
  return fmt::format("no usable CUDA device: {} ({})",
                     err == cudaSuccess ? "the driver reports 0 devices" : cudaGetErrorString(err),
                     err == cudaSuccess ? "cudaSuccess" : cudaGetErrorName(err));
}

CudaBackend::CudaBackend() {
  const std::string unusable = cuda_unusable_reason();
  DIFFMOE_CHECK(unusable.empty(), "[cuda] {}", unusable);
  CUDA_CHECK(cudaGetDevice(&device_));
  CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_));
  int smem = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
  max_smem_optin_ = static_cast<size_t>(smem);
  CUBLAS_CHECK(cublasCreate(&cublas_));
  // Plain f32 arithmetic: CUBLAS_DEFAULT_MATH never uses TF32 for SGEMM (only
  // CUBLAS_TF32_TENSOR_OP_MATH or NVIDIA_TF32_OVERRIDE would), so the f32 check against the CPU is
  // meaningful. The bf16 GEMM mode chooses its compute types per call (gemm_ops.cu, lt_gemm.h).
  CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
  cublas_workspace_.reserve(kCublasWorkspaceBytes);  // bound with the stream, in cublas()
  lt_gemm_ = std::make_unique<LtGemm>();
  issue_.reserve(sizeof(DeviceIssue));
  CUDA_CHECK(cudaMemset(issue_.get(), 0, sizeof(DeviceIssue)));
  const char* prof = std::getenv("DIFFMOE_CUDA_PROFILE");
  profiling_ = prof != nullptr && (std::strcmp(prof, "1") == 0 || std::strcmp(prof, "2") == 0);
  profile_details_ = prof != nullptr && std::strcmp(prof, "2") == 0;
  if (const char* few = std::getenv("DIFFMOE_GROUPED_FEW_ROWS"); few != nullptr) {
    char* end = nullptr;
    const long v = std::strtol(few, &end, 10);
    DIFFMOE_CHECK(end != few && *end == '\0' && v >= 0 && v <= 8,
                  "DIFFMOE_GROUPED_FEW_ROWS={}: the most rows per group of the few-rows grouped kernel, 0 to 8", few);
    few_rows_max_ = v;
  }
}

CudaBackend::~CudaBackend() {
  if (profiling_) {
    try {
      if (profile_unprinted_) print_profile();
    } catch (const Error& e) {
      fmt::print(stderr, "[cuda] op profile not printed: {}\n", e.what());
    }
    for (const PendingOp& p : profile_pending_) {
      (void)cudaEventDestroy(p.start);
      (void)cudaEventDestroy(p.stop);
    }
    for (cudaEvent_t e : profile_free_events_) (void)cudaEventDestroy(e);
  }
  if (cublas_ != nullptr) (void)cublasDestroy(cublas_);
  if (capture_stream_ != nullptr) (void)cudaStreamDestroy(capture_stream_);
}

// ---------------------------------------------------------------- op profile

namespace {
// Pending event pairs before the profile waits for them and adds them up: bounds the events alive
// (a bench step of the bench preset issues a few thousand ops).
constexpr size_t kProfileMaxPending = 8192;
}  // namespace

OpScope::OpScope(CudaBackend& be, cudaStream_t s, const char* op) : be_(be.profiling() ? &be : nullptr) {
  if (be_ != nullptr) be_->profile_begin(s, op);
}

OpScope::~OpScope() {
  if (be_ != nullptr) be_->profile_end();
}

void DetailScope::begin(CudaBackend& be, cudaStream_t s, const std::string& name) {
  be_ = &be;
  stat_ = be_->profile_detail_stat(name);
  start_ = be_->profile_event();
  stream_ = s;
  CUDA_CHECK(cudaEventRecord(start_, s));
}

DetailScope::~DetailScope() {
  if (be_ == nullptr) return;
  cudaEvent_t stop = nullptr;
  try {
    stop = be_->profile_event();
  } catch (const Error&) {
    return;  // a destructor's path: never throws
  }
  (void)cudaEventRecord(stop, stream_);
  be_->profile_push(stat_, start_, stop);
}

size_t CudaBackend::profile_detail_stat(const std::string& name) {
  for (size_t i = 0; i < profile_stats_.size(); ++i)
    if (profile_stats_[i].detail && name == profile_stats_[i].op) return i;
  profile_detail_names_.push_back(name);
  profile_stats_.push_back(ProfileStat{.op = profile_detail_names_.back().c_str(), .detail = true});
  return profile_stats_.size() - 1;
}

cudaEvent_t CudaBackend::profile_event() {
  if (profile_free_events_.empty()) {
    cudaEvent_t e = nullptr;
    CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }
  cudaEvent_t e = profile_free_events_.back();
  profile_free_events_.pop_back();
  return e;
}

void CudaBackend::profile_push(size_t stat, cudaEvent_t start, cudaEvent_t stop) {
  profile_pending_.push_back({stat, start, stop});
  profile_unprinted_ = true;
  if (profile_pending_.size() >= kProfileMaxPending) {
    try {
      profile_flush();
    } catch (const Error&) {
      // reported by the op's own checks or the next synchronize
    }
  }
}

void CudaBackend::profile_begin(cudaStream_t s, const char* op) {
  if (profile_depth_++ > 0) return;  // nested: the outermost op owns the time
  auto it = std::find_if(profile_stats_.begin(), profile_stats_.end(),
                         [&](const ProfileStat& st) { return !st.detail && std::strcmp(st.op, op) == 0; });
  if (it == profile_stats_.end()) it = profile_stats_.insert(profile_stats_.end(), ProfileStat{.op = op});
  profile_open_ = static_cast<size_t>(it - profile_stats_.begin());
  if (profile_free_events_.empty()) {
    cudaEvent_t e = nullptr;
    CUDA_CHECK(cudaEventCreate(&e));
    profile_free_events_.push_back(e);
  }
  profile_start_ = profile_free_events_.back();
  profile_free_events_.pop_back();
  profile_stream_ = s;
  CUDA_CHECK(cudaEventRecord(profile_start_, s));
}

void CudaBackend::profile_end() {
  if (--profile_depth_ > 0) return;
  cudaEvent_t stop = nullptr;
  if (profile_free_events_.empty()) {
    if (cudaEventCreate(&stop) != cudaSuccess) return;  // a destructor's path: never throws
  } else {
    stop = profile_free_events_.back();
    profile_free_events_.pop_back();
  }
  (void)cudaEventRecord(stop, profile_stream_);
  profile_push(profile_open_, profile_start_, stop);
}

void CudaBackend::profile_flush() {
  for (const PendingOp& p : profile_pending_) {
    CUDA_CHECK(cudaEventSynchronize(p.stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, p.start, p.stop));
    profile_stats_[p.stat].calls += 1;
    profile_stats_[p.stat].ms += ms;
    profile_free_events_.push_back(p.start);
    profile_free_events_.push_back(p.stop);
  }
  profile_pending_.clear();
}

void CudaBackend::reset_profile() {
  if (!profiling_) return;
  profile_flush();
  profile_stats_.clear();
  profile_unprinted_ = false;
}

void CudaBackend::print_profile() {
  if (!profiling_) return;
  profile_flush();
  profile_unprinted_ = false;
  std::vector<size_t> order(profile_stats_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return profile_stats_[a].ms > profile_stats_[b].ms; });
  double total = 0.0;
  for (const ProfileStat& st : profile_stats_) total += st.detail ? 0.0 : st.ms;
  fmt::print(
      "[cuda] op profile (device time between events around each op; DIFFMOE_CUDA_PROFILE=1, =2 adds the\n"
      "       \"· \" rows: parts of ops, already in their op's row and not in the total)\n");
  fmt::print("  {:<24} {:>8} {:>12} {:>7}\n", "op", "calls", "total ms", "%");
  for (size_t i : order) {
    const ProfileStat& st = profile_stats_[i];
    fmt::print("  {:<24} {:>8} {:>12.3f} {:>6.1f}%\n", st.detail ? fmt::format("· {}", st.op) : std::string(st.op),
               st.calls, st.ms, total > 0 ? 100.0 * st.ms / total : 0.0);
  }
  fmt::print("  {:<24} {:>8} {:>12.3f} {:>6.1f}%\n", "total", "", total, 100.0);
  // Plan creation (a heuristic query, then timed candidates) is host time that the table above does not show.
  fmt::print("[cuda] cuBLASLt plans: {} cached, {} heuristic queries since the backend began (lt_gemm.h)\n",
             lt_gemm_->plans(), lt_gemm_->heuristic_queries());
  print_gemm_choices();
}

void CudaBackend::print_gemm_choices() const {
  const std::vector<LtGemmTuneReport> reports = lt_gemm_->tune_reports();
  if (reports.empty()) return;  // no bf16-mode dense GEMM tuned yet, or DIFFMOE_GEMM_AUTOTUNE=0
  fmt::print(
      "[cuda] cuBLASLt algorithms chosen by timing (lt_gemm.h; DIFFMOE_GEMM_AUTOTUNE=0 keeps the heuristic's\n"
      "       first). Shapes as cuBLASLt sees them: a row-major gemm m×n×k is n×m×k, transposes swapped;\n"
      "       times: the fastest of the timed calls, heuristic's first choice → chosen\n");
  for (const LtGemmTuneReport& r : reports) {
    fmt::print("  {:<36} candidate {} of {}  {:>9.4f} ms → {:.4f} ms\n", r.shape, r.chosen, r.candidates,
               r.heuristic_ms, r.chosen_ms);
  }
}

cublasHandle_t CudaBackend::cublas(cudaStream_t s) {
  if (!cublas_stream_set_ || s != cublas_stream_) {
    // cublasSetStream resets the workspace to cuBLAS's default pool: set ours again after it.
    CUBLAS_CHECK(cublasSetStream(cublas_, s));
    CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_.get(), cublas_workspace_.bytes()));
    cublas_stream_ = s;
    cublas_stream_set_ = true;
  }
  return cublas_;
}

// A growing workspace moves: graphs recorded with its old address are stale (graph_epoch).
void* CudaBackend::scratch(size_t bytes) {
  const void* before = scratch_.get();
  scratch_.reserve(bytes);
  if (scratch_.get() != before) ++graph_epoch_;
  return scratch_.get();
}

void* CudaBackend::gemm_bf16_scratch(size_t bytes) {
  const void* before = gemm_bf16_scratch_.get();
  gemm_bf16_scratch_.reserve(bytes);
  if (gemm_bf16_scratch_.get() != before) ++graph_epoch_;
  return gemm_bf16_scratch_.get();
}

const int32_t* CudaBackend::read_to_host(const Tensor& t, cudaStream_t s) {
  host_staging_.resize(static_cast<size_t>(t.numel()));
  if (t.numel() == 0) return host_staging_.data();
  CUDA_CHECK(cudaMemcpyAsync(host_staging_.data(), t.data, t.nbytes(), cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaStreamSynchronize(s));
  return host_staging_.data();
}

void CudaBackend::check_issue() {
  DeviceIssue rec;
  CUDA_CHECK(cudaMemcpy(&rec, issue_.get(), sizeof(DeviceIssue), cudaMemcpyDeviceToHost));
  if (rec.flag == 0) return;
  CUDA_CHECK(cudaMemset(issue_.get(), 0, sizeof(DeviceIssue)));  // the backend stays usable
  const SiteText t = site_text(static_cast<IssueSite>(rec.site));
  if (t.group_offsets) {
    DIFFMOE_FAIL(
        "[{}] {}[{}] = {} breaks 0 = offsets[0] ≤ offsets[1] ≤ … ≤ offsets[G] ≤ rows = {} (checked on the "
        "device; the op skipped the groups it bounds, reported at the next synchronize)",
        t.op, t.field, rec.index, rec.value, rec.limit);
  }
  if (static_cast<IssueSite>(rec.site) == IssueSite::kGroupedGemmMaxRows) {
    DIFFMOE_FAIL(
        "[{}] group {} has {} rows (offsets[{}] − offsets[{}]), above max_group_rows = {} (checked on the device; "
        "the op skipped the group, reported at the next synchronize)",
        t.op, rec.index - 1, rec.value, rec.index, rec.index - 1, rec.limit);
  }
  if (t.allows_ignore) {
    DIFFMOE_FAIL(
        "[{}] {}[{}] = {} is neither −1 (ignore) nor in [0, {}) (checked on the device; the op skipped "
        "it, reported at the next synchronize)",
        t.op, t.field, rec.index, rec.value, rec.limit);
  }
  DIFFMOE_FAIL(
      "[{}] {}[{}] = {} is outside [0, {}) (checked on the device; the op skipped it, reported at the next "
      "synchronize)",
      t.op, t.field, rec.index, rec.value, rec.limit);
}

void CudaBackend::upload(const Tensor& dst, const void* src) {
  check_device(dst, Device::kCUDA, "upload", "dst");
  if (dst.nbytes() == 0) return;
  CUDA_CHECK(cudaDeviceSynchronize());  // ops on any stream may still use dst
  CUDA_CHECK(cudaMemcpy(dst.data, src, dst.nbytes(), cudaMemcpyHostToDevice));
}

void CudaBackend::download(void* dst, const Tensor& src) {
  check_device(src, Device::kCUDA, "download", "src");
  CUDA_CHECK(cudaDeviceSynchronize());
  check_issue();
  if (src.nbytes() == 0) return;
  CUDA_CHECK(cudaMemcpy(dst, src.data, src.nbytes(), cudaMemcpyDeviceToHost));
}

void CudaBackend::synchronize(Context ctx) {
  CUDA_CHECK(cudaStreamSynchronize(stream(ctx)));
  check_issue();
}

bool CudaBackend::tuning() const { return lt_gemm_ != nullptr && lt_gemm_->tuning(); }

std::unique_ptr<Backend> make_cuda_backend(int device) {
  if (device >= 0) {
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    DIFFMOE_CHECK(device < count,
                  "[cuda] device {} requested (LOCAL_RANK or cuda:N), but this machine has {} CUDA device(s)", device,
                  count);
    CUDA_CHECK(cudaSetDevice(device));  // the backend, its streams and its memory live on the current device
  }
  return std::make_unique<CudaBackend>();
}

}  // namespace diffmoe
