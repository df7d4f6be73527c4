// bertfast's C++ operators: the schemas (once, here) and the CPU kernels.
//
//   mlm_gather(hidden [B,S,H], positions int64 [B,P]) -> [B*P, H]
//       out[b*P + p] = hidden[b, positions[b,p]], or zeros where positions[b,p] == -1.
//   mlm_gather_backward(grad [B*P,H], positions [B,P], S) -> grad_hidden [B,S,H]
//       the VJP: zeros, plus grad[b*P + p] added into row positions[b,p] (duplicates accumulate, -1 dropped).
//   softmax_cross_entropy(logits [N,V], target [N], ignore_index, label_smoothing, compute_grad)
//       -> (loss: 0-d, acc dtype; grad_logits: [N,V] (empty unless compute_grad), float32 for float16 logits and
//          the logits' dtype otherwise, see grad_dtype in checks.h)
//       loss = mean over rows with target != ignore_index of the cross-entropy (0 when there are none).
//       grad_logits = d loss / d logits for grad_output = 1, i.e. (softmax - onehot) / count on kept rows and 0 on
//       ignored rows, computed in the same pass as the loss (see softmax_cross_entropy_backward_).
//   softmax_cross_entropy_backward_(grad_logits (mutated), grad_output 0-d) -> ()
//       grad_logits *= grad_output, in place (the backward; see bertfast/ops/_ext.py for why in place is safe).
//
// The CUDA kernels of the same ops are in ops_cuda.cu (TORCH_LIBRARY_IMPL(bertfast, CUDA, ...)); the argument
// checks of both are in checks.h.
// Naming, for every bertfast op (these and the Triton ones of bertfast/ops/_triton_*.py): bertfast::<public op>
// is the forward, bertfast::<public op>_backward its backward (with a trailing _ when it works in place).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu_kernels.h"

namespace bertfast {

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_avx2::compiled();
  return yes;
#else
  return false;
#endif
}

// positions must lie in [-1, S): a clear error naming the slot (CPU only; CUDA asserts on the device).
void check_positions_cpu(const int64_t* pos, int64_t B, int64_t P, int64_t S) {
  for (int64_t i = 0; i < B * P; ++i) {
    TORCH_CHECK(pos[i] >= -1 && pos[i] < S, "mlm_gather: positions[", i / P, ", ", i % P, "] = ", pos[i],
                " is out of range: must be -1 (unused) or in [0, seqlen=", S, ")");
  }
}

at::Tensor mlm_gather_cpu(const at::Tensor& hidden_in, const at::Tensor& positions_in) {
  check_gather_args(hidden_in, positions_in);
  const at::Tensor hidden = hidden_in.stride(-1) == 1 ? hidden_in : hidden_in.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  const int64_t B = hidden.size(0), S = hidden.size(1), H = hidden.size(2), P = positions.size(1);
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  check_positions_cpu(pos, B, P, S);
  at::Tensor out = at::empty({B * P, H}, hidden.options());
  if (out.numel() == 0) return out;
  const int64_t sb = hidden.stride(0), ss = hidden.stride(1);
  const size_t row_bytes = H * hidden.element_size();
  const char* src = static_cast<const char*>(hidden.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t es = hidden.element_size();
  at::parallel_for(0, B * P, std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / P, s = pos[i];
      char* d = dst + i * row_bytes;
      if (s < 0) {
        std::memset(d, 0, row_bytes);  // all-zero bits are 0.0 in every floating dtype
      } else {
        std::memcpy(d, src + (b * sb + s * ss) * es, row_bytes);
      }
    }
  });
  return out;
}

at::Tensor mlm_gather_backward_cpu(const at::Tensor& grad_in, const at::Tensor& positions_in, int64_t S) {
  check_gather_backward_args(grad_in, positions_in, S);
  const int64_t B = positions_in.size(0), P = positions_in.size(1), H = grad_in.size(1);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  check_positions_cpu(pos, B, P, S);
  // Every row of grad_hidden is written exactly once (zeros or a sum), so no separate zero-fill pass.
  at::Tensor out = at::empty({B, S, H}, grad.options());
  if (out.numel() == 0) return out;
  // Linear in P (the model gathers from h[None], so one row can hold every prediction of the batch): the slots of
  // each position are chained in ascending slot order, first[b * S + s] -> next[b * P + p] -> ... -> -1, and each
  // output row sums its chain in acc_t (the same order, so the same bits, as a loop over the slots).
  std::vector<int64_t> first(B * S, -1), next(B * P, -1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* pb = pos + b * P;
    for (int64_t p = P - 1; p >= 0; --p) {
      if (pb[p] < 0) continue;
      next[b * P + p] = first[b * S + pb[p]];
      first[b * S + pb[p]] = b * P + p;
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mlm_gather_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // one task per range of output rows: every output row is written by exactly one task
    at::parallel_for(0, B * S, std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(H);
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* orow = o + row * H;
        if (first[row] < 0) {
          std::memset(orow, 0, H * sizeof(scalar_t));
          continue;
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t q = first[row]; q >= 0; q = next[q]) {
          const scalar_t* gq = g + q * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<acc_t>(gq[h]);
        }
        for (int64_t h = 0; h < H; ++h) orow[h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                             int64_t ignore_index, double label_smoothing,
                                                             bool compute_grad) {
  check_ce_args(logits_in, target_in, label_smoothing);
  // Rows must be unit-stride; any row stride is fine (a slice logits[:, :V] is read in place).
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  const int64_t* t = target.const_data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t r = 0; r < N; ++r) {
    if (t[r] == ignore_index) continue;
    TORCH_CHECK(t[r] >= 0 && t[r] < V, "softmax_cross_entropy: target[", r, "] = ", t[r],
                " is out of range: must be in [0, vocab=", V, ") or ignore_index=", ignore_index);
    ++count;
  }
  at::Tensor row_loss = at::empty({N}, logits.options().dtype(acc_dtype));
  at::Tensor grad = compute_grad ? at::empty({N, V}, logits.options().dtype(grad_dtype(logits.scalar_type())))
                                 : at::empty({0}, logits.options());
  if (N > 0) {
    if (cpu_has_avx2()) {
      cpu_avx2::ce_forward(logits, target, ignore_index, label_smoothing, count, row_loss,
                           compute_grad ? grad : at::Tensor());
    } else {
      cpu_default::ce_forward(logits, target, ignore_index, label_smoothing, count, row_loss,
                              compute_grad ? grad : at::Tensor());
    }
  }
  // sum of the kept rows' losses / max(count, 1): 0 when every row is ignored
  at::Tensor loss = row_loss.sum().div_(static_cast<double>(std::max<int64_t>(count, 1)));
  return {loss, grad};
}

void softmax_cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_ce_backward_args(grad, grad_output);
  if (grad.numel() == 0) return;
  const double s = grad_output.item<double>();
  if (s == 1.0) return;  // the usual case (loss.backward() in fp32): the forward already wrote d loss / d logits
  if (cpu_has_avx2()) {
    cpu_avx2::scale_(grad, s);
  } else {
    cpu_default::scale_(grad, s);
  }
}

}  // namespace

TORCH_LIBRARY(bertfast, m) {
  m.def("mlm_gather(Tensor hidden, Tensor positions) -> Tensor");
  m.def("mlm_gather_backward(Tensor grad, Tensor positions, SymInt seq_len) -> Tensor");
  m.def(
      "softmax_cross_entropy(Tensor logits, Tensor target, int ignore_index=-100, float label_smoothing=0.0, "
      "bool compute_grad=False) -> (Tensor, Tensor)");
  m.def("softmax_cross_entropy_backward_(Tensor(a!) grad_logits, Tensor grad_output) -> ()");
}

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("mlm_gather", &mlm_gather_cpu);
  m.impl("mlm_gather_backward", &mlm_gather_backward_cpu);
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_cpu);
  m.impl("softmax_cross_entropy_backward_", &softmax_cross_entropy_backward_cpu);
}

}  // namespace bertfast
