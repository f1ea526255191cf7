// cuBLASLt matmuls with epilogues for the feed-forward op (interface and layout conventions in
// cublaslt_gemm.h).
//
// Why cuBLASLt: its epilogues fuse work that would otherwise be one more pass over an (M, H)
// matrix: bias + relu / gelu_tanh after GEMM1 (and the pre-activation as a side output), the
// gelu_tanh derivative and the bias gradient after grad_out @ w2, and bias gradients of weight
// GEMMs (BGRADB: column sums of the B operand over k). Limits: the GELU epilogues compute the
// tanh approximation (so they serve "gelu_tanh" only), their aux matrix needs a leading dimension
// divisible by 8, and bias gradients come out in D's dtype, summed by cuBLASLt.
//
// State: one cublasLt handle per device, created on first use and kept for the life of the
// process (handles carry no stream, so threads share them; creation is under a mutex). The
// workspace comes from torch's caching allocator for the current stream, sized by the chosen
// algorithm (at most 32 MiB on Hopper and later, 4 MiB before, as NVIDIA recommends). Any
// failing cuBLASLt status, or no algorithm, makes lt_matmul return false (the first such failure
// in a process is reported as a warning) and the caller takes the separate path: a cuBLASLt
// problem never fails the op.
#include "cuda/cublaslt_gemm.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cublasLt.h>

#include <cstdint>
#include <mutex>
#include <vector>

namespace fastformer::cuda {
namespace {

// Checks a cuBLASLt status. A combination cuBLASLt does not offer (NOT_SUPPORTED, or no
// algorithm for an epilogue and dtype) and a real failure each warn once per process, apart:
// an expected decline must not use up the warning of a later error.
bool lt_ok(cublasStatus_t status, const char* call) {
  if (status == CUBLAS_STATUS_SUCCESS) {
    return true;
  }
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) {
    TORCH_WARN_ONCE("fastformer feed_forward: cuBLASLt does not support this GEMM (", call,
                    "); using the separate path (ATen GEMMs and fastformer's kernels) for it. ",
                    "Further declines are not reported.");
  } else {
    TORCH_WARN_ONCE("fastformer feed_forward: ", call, " failed with ",
                    cublasLtGetStatusString(status),
                    "; using the separate path (ATen GEMMs and fastformer's kernels) instead. ",
                    "Further cuBLASLt failures are not reported.");
  }
  return false;
}

struct DeviceState {
  cublasLtHandle_t handle = nullptr;
  size_t max_workspace = 0;
  bool unavailable = false;  // cublasLtCreate failed: do not retry on every call
};

// The handle of the current device (nullptr when cuBLASLt cannot be used) and its workspace limit.
DeviceState device_state() {
  static std::mutex mutex;
  static std::vector<DeviceState> states;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  if (states.empty()) {
    states.resize(c10::cuda::device_count());
  }
  TORCH_CHECK(device >= 0 && static_cast<size_t>(device) < states.size(),
              "fastformer feed_forward: bad CUDA device index ", device);
  DeviceState& state = states[device];
  if (state.handle == nullptr && !state.unavailable) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    state.max_workspace = static_cast<size_t>(major >= 9 ? 32 : 4) << 20;
    cublasLtHandle_t handle = nullptr;
    if (lt_ok(cublasLtCreate(&handle), "cublasLtCreate")) {
      state.handle = handle;  // never destroyed: it lives as long as the CUDA context
    } else {
      state.unavailable = true;
    }
  }
  return state;
}

// A descriptor destroyed on scope exit (a destructor cannot report a failed destroy, and the
// matmul is already queued by then: its status is ignored).
template <typename Handle>
struct Owned {
  Handle handle = nullptr;
  cublasStatus_t (*destroy)(Handle) = nullptr;
  Owned() = default;
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() {
    if (handle != nullptr) {
      destroy(handle);
    }
  }
};

cudaDataType_t data_type(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return CUDA_R_32F;
    case c10::ScalarType::Half:
      return CUDA_R_16F;
    case c10::ScalarType::BFloat16:
      return CUDA_R_16BF;
    default:
      TORCH_CHECK(false, "fastformer feed_forward: cuBLASLt path takes float32, float16 or ",
                  "bfloat16, got ", dtype);
  }
}

cublasLtEpilogue_t lt_epilogue(LtEpilogue e) {
  switch (e) {
    case LtEpilogue::kDefault:
      return CUBLASLT_EPILOGUE_DEFAULT;
    case LtEpilogue::kBias:
      return CUBLASLT_EPILOGUE_BIAS;
    case LtEpilogue::kRelu:
      return CUBLASLT_EPILOGUE_RELU;
    case LtEpilogue::kReluBias:
      return CUBLASLT_EPILOGUE_RELU_BIAS;
    case LtEpilogue::kGelu:
      return CUBLASLT_EPILOGUE_GELU;
    case LtEpilogue::kGeluBias:
      return CUBLASLT_EPILOGUE_GELU_BIAS;
    case LtEpilogue::kGeluAux:
      return CUBLASLT_EPILOGUE_GELU_AUX;
    case LtEpilogue::kGeluAuxBias:
      return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case LtEpilogue::kDGelu:
      return CUBLASLT_EPILOGUE_DGELU;
    case LtEpilogue::kDGeluBGrad:
      return CUBLASLT_EPILOGUE_DGELU_BGRAD;
    case LtEpilogue::kBGradB:
      return CUBLASLT_EPILOGUE_BGRADB;
  }
  TORCH_CHECK(false, "fastformer feed_forward: unknown cuBLASLt epilogue");
}

bool uses_bias(LtEpilogue e) {
  return e == LtEpilogue::kBias || e == LtEpilogue::kReluBias || e == LtEpilogue::kGeluBias ||
         e == LtEpilogue::kGeluAuxBias || e == LtEpilogue::kDGeluBGrad || e == LtEpilogue::kBGradB;
}

bool uses_aux(LtEpilogue e) {
  return e == LtEpilogue::kGeluAux || e == LtEpilogue::kGeluAuxBias || e == LtEpilogue::kDGelu ||
         e == LtEpilogue::kDGeluBGrad;
}

// Largest power of two <= 16 dividing the address: what the heuristic may assume.
uint32_t alignment(const void* p) {
  uint32_t a = 16;
  while (a > 1 && reinterpret_cast<uintptr_t>(p) % a != 0) {
    a /= 2;
  }
  return a;
}

template <typename Value>
bool set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute,
              const Value& value) {
  return lt_ok(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)),
               "cublasLtMatmulDescSetAttribute");
}

template <typename Value>
bool set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attribute,
              const Value& value) {
  return lt_ok(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &value, sizeof(value)),
               "cublasLtMatmulPreferenceSetAttribute");
}

// A column-major matrix layout: rows x cols with leading dimension ld.
bool make_layout(Owned<cublasLtMatrixLayout_t>& layout, cudaDataType_t type, int64_t rows,
                 int64_t cols, int64_t ld) {
  layout.destroy = cublasLtMatrixLayoutDestroy;
  return lt_ok(cublasLtMatrixLayoutCreate(&layout.handle, type, static_cast<uint64_t>(rows),
                                          static_cast<uint64_t>(cols), ld),
               "cublasLtMatrixLayoutCreate");
}

}  // namespace

bool lt_matmul(const LtMatmul& mm, c10::ScalarType dtype, bool allow_tf32, cudaStream_t stream) {
  if (mm.m <= 0 || mm.n <= 0 || mm.k <= 0) {
    return false;  // empty products: the caller's ATen path handles them
  }
  const DeviceState state = device_state();
  if (state.handle == nullptr) {
    return false;
  }
  const cudaDataType_t type = data_type(dtype);
  const cublasComputeType_t compute = dtype == c10::ScalarType::Float && allow_tf32
                                          ? CUBLAS_COMPUTE_32F_FAST_TF32
                                          : CUBLAS_COMPUTE_32F;
  const cublasLtEpilogue_t epilogue = lt_epilogue(mm.epilogue);
  const cublasOperation_t op_a = mm.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = mm.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;

  Owned<cublasLtMatmulDesc_t> desc;
  desc.destroy = cublasLtMatmulDescDestroy;
  if (!lt_ok(cublasLtMatmulDescCreate(&desc.handle, compute, CUDA_R_32F),
             "cublasLtMatmulDescCreate") ||
      !set_desc(desc.handle, CUBLASLT_MATMUL_DESC_TRANSA, op_a) ||
      !set_desc(desc.handle, CUBLASLT_MATMUL_DESC_TRANSB, op_b) ||
      !set_desc(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue)) {
    return false;
  }
  if (uses_bias(mm.epilogue)) {
    // The bias (gradient) has D's dtype, cuBLASLt's default for CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE.
    TORCH_CHECK(mm.bias != nullptr, "fastformer feed_forward: cuBLASLt epilogue without bias");
    if (!set_desc(desc.handle, CUBLASLT_MATMUL_DESC_BIAS_POINTER, mm.bias)) {
      return false;
    }
  }
  if (uses_aux(mm.epilogue)) {
    TORCH_CHECK(mm.aux != nullptr && mm.ld_aux % 8 == 0 && mm.ld_aux >= mm.m,
                "fastformer feed_forward: cuBLASLt GELU aux needs a leading dimension that is a ",
                "multiple of 8 and >= m");
    if (!set_desc(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, mm.aux) ||
        !set_desc(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, mm.ld_aux)) {
      return false;
    }
  }

  // Stored shapes: op(A) is m x k, so A is m x k (N) or k x m (T); op(B) is k x n.
  Owned<cublasLtMatrixLayout_t> layout_a;
  Owned<cublasLtMatrixLayout_t> layout_b;
  Owned<cublasLtMatrixLayout_t> layout_d;
  if (!make_layout(layout_a, type, mm.transpose_a ? mm.k : mm.m, mm.transpose_a ? mm.m : mm.k,
                   mm.lda) ||
      !make_layout(layout_b, type, mm.transpose_b ? mm.n : mm.k, mm.transpose_b ? mm.k : mm.n,
                   mm.ldb) ||
      !make_layout(layout_d, type, mm.m, mm.n, mm.ldd)) {
    return false;
  }

  Owned<cublasLtMatmulPreference_t> pref;
  pref.destroy = cublasLtMatmulPreferenceDestroy;
  const uint64_t max_workspace = state.max_workspace;
  // Split-k partial sums reduced in float (the compute type), never in the output type (the
  // INPLACE and OUTPUT_TYPE schemes would round them to float16 / bfloat16).
  const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  if (!lt_ok(cublasLtMatmulPreferenceCreate(&pref.handle), "cublasLtMatmulPreferenceCreate") ||
      !set_pref(pref.handle, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, max_workspace) ||
      !set_pref(pref.handle, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reductions) ||
      !set_pref(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(mm.a)) ||
      !set_pref(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(mm.b)) ||
      !set_pref(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(mm.d)) ||
      !set_pref(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(mm.d))) {
    return false;
  }

  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  if (!lt_ok(cublasLtMatmulAlgoGetHeuristic(state.handle, desc.handle, layout_a.handle,
                                            layout_b.handle, layout_d.handle, layout_d.handle,
                                            pref.handle, 1, &heuristic, &found),
             "cublasLtMatmulAlgoGetHeuristic")) {
    return false;
  }
  if (found == 0) {
    return lt_ok(CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmulAlgoGetHeuristic (no algorithm)");
  }

  // The workspace is freed when this returns; the caching allocator reuses it only for work
  // queued after the matmul on the same stream.
  c10::DataPtr workspace;
  if (heuristic.workspaceSize > 0) {
    workspace = c10::cuda::CUDACachingAllocator::get()->allocate(heuristic.workspaceSize);
  }
  const float alpha = 1.f;
  const float beta = 0.f;
  return lt_ok(cublasLtMatmul(state.handle, desc.handle, &alpha, mm.a, layout_a.handle, mm.b,
                              layout_b.handle, &beta, mm.d, layout_d.handle, mm.d,
                              layout_d.handle, &heuristic.algo, workspace.get(),
                              heuristic.workspaceSize, stream),
               "cublasLtMatmul");
}

}  // namespace fastformer::cuda
