// CUDA implementation of fastformer::feed_forward_fwd / _bwd (schemas and maths in ops.cpp):
//   pre = x @ w1.T + b1,  hidden = dropout(act(pre)) (gated: act(gate) * up),
//   out = hidden @ w2.T + b2
// on 2-D row-major operands x (M, K), w1 (H1, K), w2 (N, H) in float32, float16 or bfloat16
// (GEMMs accumulate in float32, TF32 only where torch allows it; elementwise maths in float32).
//
// Two paths, chosen per call by FASTFORMER_FF_EPILOGUE (choose_path below):
//   "separate": ATen GEMMs (cuBLAS) and fastformer's elementwise kernels
//     (feed_forward_kernels.cu). Forward: pre = addmm(b1, x, w1.T) (bias and product rounded
//     once, as F.linear); kernel: act, dropout -> hidden; out = addmm(b2, hidden, w2.T).
//     Backward: grad_hidden = grad_out @ w2; kernel -> grad_pre, hidden (recomputed) and grad_b1
//     (deterministic column sums); grad_w2 = grad_out.T @ hidden, grad_b2 = column sums of
//     grad_out (ATen, in float32), grad_w1 = grad_pre.T @ x, grad_x = grad_pre @ w1.
//   "cublaslt": the same steps with cuBLASLt epilogues where they compute exactly what is asked
//     (cublaslt_gemm.h): GEMM1 with RELU_BIAS ("relu": relu(pre) is both hidden and the saved
//     preact, which the schema allows), GELU_AUX_BIAS ("gelu_tanh": D = hidden, aux = pre) or
//     BIAS (the others, then the kernel); GEMM2 with BIAS; in backward DGELU_BGRAD ("gelu_tanh":
//     grad_pre and grad_b1 from grad_out @ w2 and aux = pre, then the forward kernel recomputes
//     hidden), and BGRADB on the weight-gradient GEMMs for grad_b2 and grad_b1 (cuBLASLt's sums,
//     rounded to x's dtype). Activation epilogues only without dropout (dropout sits between the
//     activation and GEMM2, so it needs the kernel); BGRADB sums what the kernel wrote, so it
//     serves with dropout too. A step cuBLASLt declines (no algorithm, an error status, an aux
//     leading dimension H that is not a multiple of 8) runs as in the separate path.
//   Both paths recompute pre in backward exactly as their forward computed it when saving it, so
//   saving pre or recomputing it gives the same gradients, bit for bit.
//
// Row-major tensors as cuBLAS column-major operands: a contiguous row-major (r, c) matrix X is
// the column-major c x r matrix X^T with leading dimension c. Hence, for D = op_a(A) @ op_b(B)
// (D m x n, op_a(A) m x k, column-major):
//   linear       C (r, c) = P (r, k) @ W.T with W (c, k), i.e. C^T = W @ P^T:
//                  m = c, n = r, k = k; A = W's buffer (stored k x c = W^T, ld k), transposed;
//                  B = P's buffer (stored k x r = P^T, ld k); D = C's buffer (c x r, ld c);
//                  bias (BIAS epilogues): m = c values, one per column of C.
//                GEMM1: P = x, W = w1 (c = H1); GEMM2: P = hidden, W = w2 (c = N).
//   weight grad  G_W (c, k) = G.T @ P with G (r, c), P (r, k), i.e. G_W^T = P^T @ G:
//                  m = k, n = c, k = r; A = P's buffer (stored k x r = P^T, ld k);
//                  B = G's buffer (stored c x r = G^T, ld c), transposed so op_b(B) = G (r x c);
//                  D = G_W's buffer (k x c, ld k); BGRADB sums op_b(B) over k = r: the column
//                  sums of G (c values).
//                grad_w2: G = grad_out, P = hidden (-> grad_b2); grad_w1: G = grad_pre, P = x
//                (-> grad_b1).
//   grad_hidden  (M, H) = grad_out (M, N) @ w2 (N, H), i.e. its transpose = w2^T @ grad_out^T:
//                  m = H, n = M, k = N; A = w2's buffer (stored H x N = w2^T, ld H);
//                  B = grad_out's buffer (stored N x M, ld N); D = grad_pre's buffer (H x M, ld H);
//                  aux = pre's buffer (H x M, ld H); DGELU_BGRAD's bias gradient: m = H values,
//                  the column sums of grad_pre.
//
// Checks are brief (the Python layer checks and names the user's arguments). Inputs are made
// contiguous; the work runs on the current stream of x's device.
#include "cuda/cublaslt_gemm.h"
#include "cuda/feed_forward_kernels.h"
#include "feed_forward.h"

#include <ATen/Context.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string_view>
#include <tuple>

namespace fastformer::cuda {
namespace {

using at::ScalarType;
using at::Tensor;

constexpr const char* kOp = "feed_forward";

// ---------------------------------------------------------------------------------------------
// Path selection

enum class Path { kSeparate, kCublasLt };

// FASTFORMER_FF_EPILOGUE = "separate" | "cublaslt" | "auto" (default), read on every call so
// that a benchmark can compare the two in one process. "auto" is "separate" for now: which path
// wins depends on the shape, dtype and GPU, and the choice per shape awaits GPU measurements
// (the feed-forward benchmark runs both).
Path choose_path() {
  const char* env = std::getenv("FASTFORMER_FF_EPILOGUE");
  const std::string_view value = env != nullptr ? env : "auto";
  if (value == "separate") {
    return Path::kSeparate;
  }
  if (value == "cublaslt") {
    return Path::kCublasLt;
  }
  TORCH_CHECK(value == "auto" || value.empty(), kOp,
              ": FASTFORMER_FF_EPILOGUE must be separate, cublaslt or auto, got '", value, "'");
  return Path::kSeparate;
}

// ---------------------------------------------------------------------------------------------
// Checks

struct Problem {
  Activation act;
  ElementwiseShape shape;  // M, H, H1
  int64_t K;               // x's features
  int64_t N;               // out's features
};

void check_matrix(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), kOp, ": ", name, " must be on ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.dim() == 2, kOp, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

Problem check_operands(const Tensor& x, const Tensor& w1, const Tensor& w2,
                       std::string_view activation) {
  const Activation act = parse_activation(activation);
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());
  const ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Half ||
                  dtype == ScalarType::BFloat16,
              kOp, ": CUDA x must be float32, float16 or bfloat16, got ", dtype);
  check_matrix(x, x, "x");
  check_matrix(w1, x, "w1");
  check_matrix(w2, x, "w2");
  const FeedForwardSizes sizes = check_feed_forward_sizes(act, x.sizes(), w1.sizes(), w2.sizes());
  return {act, {sizes.M, sizes.H, sizes.H1}, sizes.K, sizes.N};
}

// b1 / b2 as a contiguous (n,) tensor, or nullopt.
std::optional<Tensor> check_bias(const std::optional<Tensor>& b, int64_t n, const Tensor& x,
                                 const char* name) {
  if (!b.has_value() || !b->defined()) {
    return std::nullopt;
  }
  TORCH_CHECK(b->device() == x.device(), kOp, ": ", name, " must be on ", x.device());
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n, kOp, ": ", name, " must have shape [", n,
              "], got ", b->sizes());
  TORCH_CHECK(b->scalar_type() == x.scalar_type(), kOp, ": ", name, " must have x's dtype");
  return b->contiguous();
}

// The dropout arguments; `seed_holder` keeps the contiguous seed alive.
DropoutArgs check_dropout(const std::optional<Tensor>& seed, double p, const Tensor& x,
                          Tensor& seed_holder) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, kOp, ": dropout_p must be in [0, 1), got ", p);
  DropoutArgs dropout;
  if (p == 0.0) {
    return dropout;
  }
  TORCH_CHECK(seed.has_value() && seed->defined(), kOp, ": seed is required when dropout_p > 0");
  TORCH_CHECK(seed->device() == x.device(), kOp, ": seed must be on ", x.device(), ", got ",
              seed->device());
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == ScalarType::Long, kOp,
              ": seed must be an int64 tensor of one element");
  seed_holder = seed->contiguous();
  dropout.seed = seed_holder.const_data_ptr<int64_t>();
  dropout.p = static_cast<float>(p);
  dropout.scale = 1.0 / (1.0 - p);
  return dropout;
}

const void* ptr_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

Tensor empty(at::IntArrayRef sizes, const Tensor& like) {
  return at::empty(sizes, like.options());
}

bool allow_tf32() {
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
}

// ---------------------------------------------------------------------------------------------
// cuBLASLt GEMMs in row-major terms (derivations in the header comment). Each returns false when
// cuBLASLt declined; nothing was written then.

// c (r, n) = p (r, k) @ w.T (w: (n, k)), with the epilogue's bias (n,) and aux (r, n).
bool lt_linear(Tensor& c, const Tensor& p, const Tensor& w, LtEpilogue epilogue,
               const void* bias = nullptr, void* aux = nullptr) {
  LtMatmul mm;
  mm.m = w.size(0);
  mm.n = p.size(0);
  mm.k = p.size(1);
  mm.transpose_a = true;
  mm.a = w.const_data_ptr();
  mm.lda = mm.k;
  mm.transpose_b = false;
  mm.b = p.const_data_ptr();
  mm.ldb = mm.k;
  mm.d = c.data_ptr();
  mm.ldd = mm.m;
  mm.epilogue = epilogue;
  mm.bias = const_cast<void*>(bias);
  mm.aux = aux;
  mm.ld_aux = mm.m;
  return lt_matmul(mm, c.scalar_type(), allow_tf32(), c10::cuda::getCurrentCUDAStream());
}

// grad_w (n, k) = g.T @ p with g (r, n), p (r, k); grad_bias (n,) = column sums of g (BGRADB).
bool lt_weight_grad(Tensor& grad_w, const Tensor& g, const Tensor& p, Tensor& grad_bias) {
  LtMatmul mm;
  mm.m = p.size(1);
  mm.n = g.size(1);
  mm.k = p.size(0);
  mm.transpose_a = false;
  mm.a = p.const_data_ptr();
  mm.lda = mm.m;
  mm.transpose_b = true;
  mm.b = g.const_data_ptr();
  mm.ldb = mm.n;
  mm.d = grad_w.data_ptr();
  mm.ldd = mm.m;
  mm.epilogue = LtEpilogue::kBGradB;
  mm.bias = grad_bias.data_ptr();
  return lt_matmul(mm, g.scalar_type(), allow_tf32(), c10::cuda::getCurrentCUDAStream());
}

// grad_pre (M, H) = (grad_out @ w2) * gelu_tanh'(pre), and grad_b1 (H,) its column sums when
// defined (DGELU_BGRAD; DGELU without).
bool lt_dgelu(Tensor& grad_pre, const Tensor& grad_out, const Tensor& w2, const Tensor& pre,
              Tensor& grad_b1) {
  LtMatmul mm;
  mm.m = w2.size(1);
  mm.n = grad_out.size(0);
  mm.k = grad_out.size(1);
  mm.transpose_a = false;
  mm.a = w2.const_data_ptr();
  mm.lda = mm.m;
  mm.transpose_b = false;
  mm.b = grad_out.const_data_ptr();
  mm.ldb = mm.k;
  mm.d = grad_pre.data_ptr();
  mm.ldd = mm.m;
  mm.epilogue = grad_b1.defined() ? LtEpilogue::kDGeluBGrad : LtEpilogue::kDGelu;
  mm.bias = grad_b1.defined() ? grad_b1.data_ptr() : nullptr;
  mm.aux = const_cast<void*>(pre.const_data_ptr());  // read only by DGELU
  mm.ld_aux = mm.m;
  return lt_matmul(mm, grad_out.scalar_type(), allow_tf32(), c10::cuda::getCurrentCUDAStream());
}

// Which activation epilogue GEMM1 can use: relu and gelu_tanh, plain, without dropout; the
// GELU aux (pre) needs a leading dimension H divisible by 8.
enum class Gemm1Epilogue { kNone, kRelu, kGeluTanh };

Gemm1Epilogue gemm1_epilogue(const Problem& pb, const DropoutArgs& dropout, bool need_pre) {
  if (dropout.seed != nullptr || pb.act.gated) {
    return Gemm1Epilogue::kNone;
  }
  if (pb.act.kind == ActivationKind::kRelu) {
    return Gemm1Epilogue::kRelu;
  }
  if (pb.act.kind == ActivationKind::kGeluTanh && (!need_pre || pb.shape.hidden_cols % 8 == 0)) {
    return Gemm1Epilogue::kGeluTanh;
  }
  return Gemm1Epilogue::kNone;
}

// GEMM1's results: pre = x @ w1.T + b1 (relu epilogue: relu(pre), which serves as preact;
// undefined when not needed) and, after an activation epilogue, hidden.
struct Gemm1 {
  Tensor pre;
  Tensor hidden;
};

// GEMM1 through cuBLASLt, fused with what it can take:
//   relu:      hidden = pre = relu(x @ w1.T + b1)                   (RELU_BIAS)
//   gelu_tanh: hidden = gelu_tanh(pre), pre as aux when need_pre    (GELU_AUX_BIAS / GELU_BIAS)
//   others:    pre = x @ w1.T + b1                                  (BIAS; only with a b1)
// Returns false when it did nothing (cuBLASLt declined, or nothing to fuse).
bool gemm1_cublaslt(Gemm1& r, const Problem& pb, const DropoutArgs& dropout, const Tensor& x,
                    const Tensor& w1, const std::optional<Tensor>& b1, bool need_pre) {
  const int64_t M = pb.shape.rows;
  const void* bias = ptr_or_null(b1);
  switch (gemm1_epilogue(pb, dropout, need_pre)) {
    case Gemm1Epilogue::kRelu: {
      Tensor hidden = empty({M, pb.shape.hidden_cols}, x);
      if (!lt_linear(hidden, x, w1, bias ? LtEpilogue::kReluBias : LtEpilogue::kRelu, bias)) {
        break;
      }
      r = {hidden, hidden};
      return true;
    }
    case Gemm1Epilogue::kGeluTanh: {
      Tensor hidden = empty({M, pb.shape.hidden_cols}, x);
      Tensor pre = need_pre ? empty({M, pb.shape.pre_cols}, x) : Tensor();
      const LtEpilogue epilogue = need_pre
                                      ? (bias ? LtEpilogue::kGeluAuxBias : LtEpilogue::kGeluAux)
                                      : (bias ? LtEpilogue::kGeluBias : LtEpilogue::kGelu);
      if (!lt_linear(hidden, x, w1, epilogue, bias, need_pre ? pre.data_ptr() : nullptr)) {
        break;
      }
      r = {pre, hidden};
      return true;
    }
    case Gemm1Epilogue::kNone:
      break;
  }
  if (bias == nullptr) {
    return false;  // a plain GEMM: ATen's
  }
  Tensor pre = empty({M, pb.shape.pre_cols}, x);
  if (!lt_linear(pre, x, w1, LtEpilogue::kBias, bias)) {
    return false;
  }
  r = {pre, Tensor()};
  return true;
}

// GEMM1 by either path. The separate path's GEMM adds the bias too (at::addmm: bias and product
// rounded once, as F.linear), so pre is the same kind of value on both paths.
Gemm1 gemm1(bool lt, const Problem& pb, const DropoutArgs& dropout, const Tensor& x,
            const Tensor& w1, const std::optional<Tensor>& b1, bool need_pre) {
  Gemm1 r;
  if (!(lt && gemm1_cublaslt(r, pb, dropout, x, w1, b1, need_pre))) {
    r = {b1.has_value() ? at::addmm(*b1, x, w1.t()) : at::mm(x, w1.t()), Tensor()};
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// The ops

std::tuple<Tensor, Tensor> feed_forward_fwd_cuda(const Tensor& x_in, const Tensor& w1_in,
                                                 const std::optional<Tensor>& b1_in,
                                                 const Tensor& w2_in,
                                                 const std::optional<Tensor>& b2_in,
                                                 c10::string_view activation, double dropout_p,
                                                 const std::optional<Tensor>& seed,
                                                 bool save_preact) {
  // ATen calls below run beneath autograd: the op's own formula (csrc/autograd.cpp)
  // differentiates it.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem pb = check_operands(x_in, w1_in, w2_in, activation);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor w1 = w1_in.contiguous();
  const Tensor w2 = w2_in.contiguous();
  const std::optional<Tensor> b1 = check_bias(b1_in, pb.shape.pre_cols, x, "b1");
  const std::optional<Tensor> b2 = check_bias(b2_in, pb.N, x, "b2");
  Tensor seed_holder;
  const DropoutArgs dropout = check_dropout(seed, dropout_p, x, seed_holder);
  const int64_t M = pb.shape.rows;
  const bool lt = choose_path() == Path::kCublasLt;

  const Gemm1 g1 = gemm1(lt, pb, dropout, x, w1, b1, save_preact);
  Tensor hidden = g1.hidden;
  if (!hidden.defined()) {
    // Plain activations without a saved pre write hidden over pre: one (M, H) buffer fewer.
    const bool in_place = !pb.act.gated && !save_preact;
    hidden = in_place ? g1.pre : empty({M, pb.shape.hidden_cols}, x);
    launch_forward(x.scalar_type(), pb.act, pb.shape, {g1.pre.const_data_ptr(), hidden.data_ptr()},
                   dropout, c10::cuda::getCurrentCUDAStream());
  }

  Tensor out;
  if (lt && b2.has_value()) {
    out = empty({M, pb.N}, x);
    if (!lt_linear(out, hidden, w2, LtEpilogue::kBias, b2->const_data_ptr())) {
      out = Tensor();
    }
  }
  if (!out.defined()) {
    out = b2.has_value() ? at::addmm(*b2, hidden, w2.t()) : at::mm(hidden, w2.t());
  }
  return {out, save_preact ? g1.pre : empty({0}, x)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> feed_forward_bwd_cuda(
    const Tensor& grad_out_in, const Tensor& x_in, const Tensor& w1_in,
    const std::optional<Tensor>& b1_in, const Tensor& w2_in, const std::optional<Tensor>& preact,
    c10::string_view activation, double dropout_p, const std::optional<Tensor>& seed,
    bool has_b2) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward
  const Problem pb = check_operands(x_in, w1_in, w2_in, activation);
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_matrix(grad_out_in, x_in, "grad_out");
  const int64_t M = pb.shape.rows;
  const int64_t H = pb.shape.hidden_cols;
  const int64_t H1 = pb.shape.pre_cols;
  TORCH_CHECK(grad_out_in.size(0) == M && grad_out_in.size(1) == pb.N, kOp,
              ": grad_out must have shape [", M, ", ", pb.N, "], got ", grad_out_in.sizes());
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor x = x_in.contiguous();
  const Tensor w1 = w1_in.contiguous();
  const Tensor w2 = w2_in.contiguous();
  const std::optional<Tensor> b1 = check_bias(b1_in, H1, x, "b1");
  Tensor seed_holder;
  const DropoutArgs dropout = check_dropout(seed, dropout_p, x, seed_holder);
  const ScalarType dtype = x.scalar_type();
  const bool lt = choose_path() == Path::kCublasLt;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // pre: saved, or recomputed exactly as the forward computed it when saving it (same GEMM and
  // epilogue, so the same bits and the same gradients either way).
  Tensor pre;
  Tensor hidden;
  if (preact.has_value() && preact->defined()) {
    check_matrix(*preact, x, "preact");
    TORCH_CHECK(preact->size(0) == M && preact->size(1) == H1, kOp, ": preact must have shape [",
                M, ", ", H1, "], got ", preact->sizes());
    pre = preact->contiguous();
  } else {
    const Gemm1 g1 = gemm1(lt, pb, dropout, x, w1, b1, /*need_pre=*/true);
    pre = g1.pre;
    // relu's epilogue output is hidden itself (= relu(relu(pre))); gelu_tanh's is not used, as
    // with a saved preact hidden is the kernel's gelu_tanh(pre).
    if (pb.act.kind == ActivationKind::kRelu) {
      hidden = g1.hidden;
    }
  }

  // grad_pre (and grad_b1 when the epilogue gives it), and hidden for grad_w2.
  Tensor grad_pre;
  Tensor grad_b1;
  if (lt && dropout.seed == nullptr && !pb.act.gated && pb.act.kind == ActivationKind::kGeluTanh &&
      H % 8 == 0) {
    grad_pre = empty({M, H}, x);
    Tensor sums = b1.has_value() ? empty({H}, x) : Tensor();
    if (lt_dgelu(grad_pre, grad_out, w2, pre, sums)) {
      grad_b1 = sums;
      hidden = empty({M, H}, x);
      launch_forward(dtype, pb.act, pb.shape, {pre.const_data_ptr(), hidden.data_ptr()}, dropout,
                     stream);
    } else {
      grad_pre = Tensor();
    }
  }
  if (!grad_pre.defined()) {
    const Tensor grad_hidden = at::mm(grad_out, w2);
    grad_pre = pb.act.gated ? empty({M, H1}, x) : grad_hidden;
    const bool need_hidden = !hidden.defined();
    if (need_hidden) {
      hidden = empty({M, H}, x);
    }
    // The separate path sums grad_b1 in the kernel; the cuBLASLt path in grad_w1's GEMM.
    if (!lt && b1.has_value()) {
      grad_b1 = empty({H1}, x);
    }
    const BackwardArgs args{grad_hidden.const_data_ptr(), pre.const_data_ptr(),
                            grad_pre.data_ptr(), need_hidden ? hidden.data_ptr() : nullptr,
                            grad_b1.defined() ? grad_b1.data_ptr() : nullptr};
    launch_backward(dtype, pb.act, pb.shape, args, dropout, stream);
  }

  // grad_w2 = grad_out.T @ hidden, grad_b2 = column sums of grad_out.
  Tensor grad_w2;
  Tensor grad_b2;
  if (lt && has_b2) {
    grad_w2 = empty({pb.N, H}, x);
    grad_b2 = empty({pb.N}, x);
    if (!lt_weight_grad(grad_w2, grad_out, hidden, grad_b2)) {
      grad_w2 = grad_b2 = Tensor();
    }
  }
  if (!grad_w2.defined()) {
    grad_w2 = at::mm(grad_out.t(), hidden);
  }
  if (!grad_b2.defined()) {
    grad_b2 = has_b2 ? at::sum(grad_out, {0}, false, ScalarType::Float).to(dtype) : empty({0}, x);
  }

  // grad_w1 = grad_pre.T @ x, grad_b1 = column sums of grad_pre (unless summed above).
  Tensor grad_w1;
  if (lt && b1.has_value() && !grad_b1.defined()) {
    grad_w1 = empty({H1, pb.K}, x);
    grad_b1 = empty({H1}, x);
    if (!lt_weight_grad(grad_w1, grad_pre, x, grad_b1)) {
      grad_w1 = grad_b1 = Tensor();
    }
  }
  if (!grad_w1.defined()) {
    grad_w1 = at::mm(grad_pre.t(), x);
  }
  if (!grad_b1.defined()) {
    grad_b1 = b1.has_value() ? at::sum(grad_pre, {0}, false, ScalarType::Float).to(dtype)
                             : empty({0}, x);
  }
  Tensor grad_x = at::mm(grad_pre, w1);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace
}  // namespace fastformer::cuda

TORCH_LIBRARY_IMPL(fastformer, CUDA, m) {
  m.impl("feed_forward_fwd", &fastformer::cuda::feed_forward_fwd_cuda);
  m.impl("feed_forward_bwd", &fastformer::cuda::feed_forward_bwd_cuda);
}
