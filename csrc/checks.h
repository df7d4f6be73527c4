// Argument checks of bertfast's operators, shared by the CPU kernels (ops.cpp) and the CUDA kernels (ops_cuda.cu)
// so the two cannot drift apart. Each message names the op and the argument and says what was expected.
// Value checks that need the data on the host (positions in range, targets in range) are not here: the CPU
// kernels check them while reading, the CUDA kernels assert on the device.
#pragma once

#include <ATen/ATen.h>

namespace bertfast {

// The dtype of softmax_cross_entropy's gradient buffer for logits of dtype `logits`: float32 for float16 logits.
// The buffer holds d loss / d logits for grad_output = 1, i.e. (softmax - onehot) / count; under fp16 training
// (GradScaler) the loss scale multiplies it only in the backward, and most of those values (~1 / (V * count)) are
// below fp16's smallest subnormal, so stored in fp16 they would round to zero before being scaled. bfloat16 has
// float32's exponent range and keeps its own dtype. Costs 2 extra bytes per logit for fp16 logits.
inline at::ScalarType grad_dtype(at::ScalarType logits) { return logits == at::kHalf ? at::kFloat : logits; }

inline void check_gather_args(const at::Tensor& hidden, const at::Tensor& positions) {
  TORCH_CHECK(hidden.dim() == 3, "mlm_gather: hidden must be [batch, seqlen, hidden], got shape ", hidden.sizes());
  TORCH_CHECK(positions.dim() == 2, "mlm_gather: positions must be [batch, P], got shape ", positions.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong, "mlm_gather: positions must be int64, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.size(0) == hidden.size(0), "mlm_gather: positions has batch ", positions.size(0),
              " but hidden has batch ", hidden.size(0));
  TORCH_CHECK(positions.device() == hidden.device(), "mlm_gather: positions is on ", positions.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "mlm_gather: hidden must be floating point, got ",
              hidden.scalar_type());
}

inline void check_gather_backward_args(const at::Tensor& grad, const at::Tensor& positions, int64_t seq_len) {
  TORCH_CHECK(grad.dim() == 2, "mlm_gather_backward: grad must be [batch * P, hidden], got shape ", grad.sizes());
  TORCH_CHECK(positions.dim() == 2 && positions.scalar_type() == at::kLong,
              "mlm_gather_backward: positions must be int64 [batch, P], got ", positions.scalar_type(), " ",
              positions.sizes());
  TORCH_CHECK(grad.size(0) == positions.size(0) * positions.size(1), "mlm_gather_backward: grad has ", grad.size(0),
              " rows, expected batch * P = ", positions.size(0) * positions.size(1));
  TORCH_CHECK(positions.device() == grad.device(), "mlm_gather_backward: positions is on ", positions.device(),
              " but grad is on ", grad.device());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "mlm_gather_backward: grad must be floating point, got ",
              grad.scalar_type());
  TORCH_CHECK(seq_len >= 0, "mlm_gather_backward: seq_len must be >= 0, got ", seq_len);
}

inline void check_ce_args(const at::Tensor& logits, const at::Tensor& target, double label_smoothing) {
  TORCH_CHECK(logits.dim() == 2, "softmax_cross_entropy: logits must be [N, vocab], got shape ", logits.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0),
              "softmax_cross_entropy: target must be [N] with N = ", logits.size(0), " (rows of logits), got shape ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "softmax_cross_entropy: target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "softmax_cross_entropy: target is on ", target.device(),
              " but logits is on ", logits.device());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "softmax_cross_entropy: logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0, "softmax_cross_entropy: vocab size must be > 0");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "softmax_cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
}

inline void check_ce_backward_args(const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.numel() == 1, "softmax_cross_entropy_backward_: grad_output must have one element, got ",
              grad_output.numel());
  TORCH_CHECK(grad.is_contiguous(), "softmax_cross_entropy_backward_: grad_logits must be contiguous");
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()),
              "softmax_cross_entropy_backward_: grad_logits must be floating point, got ", grad.scalar_type());
}

}  // namespace bertfast
