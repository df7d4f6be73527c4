// CPU kernels of the softmax cross-entropy, written once with at::vec and compiled twice:
//   cpu_kernels.cpp       the portable build (at::vec's DEFAULT capability, whatever the compiler flags give)
//   cpu_kernels_avx2.cpp  x86-64 with AVX2+FMA (GCC `#pragma GCC target`; picked at run time by cpu_has_avx2())
// Each translation unit defines BERTFAST_CPU_NS before including this file, so the two builds live in different
// namespaces (as at::vec's own CPU_CAPABILITY namespaces do) and never collide at link time.
#pragma once

#include <ATen/ATen.h>

namespace bertfast {
namespace cpu_default {
void ce_forward(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double smoothing,
                int64_t count, const at::Tensor& row_loss, const at::Tensor& grad);
void scale_(const at::Tensor& grad, double s);
}  // namespace cpu_default
namespace cpu_avx2 {
// Defined only where cpu_kernels_avx2.cpp was compiled with AVX2 (see BERTFAST_HAVE_AVX2_TU there).
bool compiled();
void ce_forward(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double smoothing,
                int64_t count, const at::Tensor& row_loss, const at::Tensor& grad);
void scale_(const at::Tensor& grad, double s);
}  // namespace cpu_avx2
}  // namespace bertfast

#ifdef BERTFAST_CPU_NS

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace bertfast {
namespace BERTFAST_CPU_NS {
namespace {

using at::vec::Vectorized;

// Elements per chunk of the online softmax: a chunk's inputs and exps stay in L1 between its max and its sum.
constexpr int64_t kChunk = 1024;

template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();  // max error ~2 ulp, no library call (float32 accumulation tolerates it)
  } else {
    return x.exp();
  }
}

// src[0..n) (converted to acc_t) -> dst[0..n) acc_t. Only used for half types.
template <typename scalar_t, typename acc_t>
inline void to_acc(const scalar_t* src, acc_t* dst, int64_t n) {
  using VecS = Vectorized<scalar_t>;
  using VecA = Vectorized<acc_t>;
  int64_t j = 0;
  if constexpr (VecS::size() == 2 * VecA::size()) {
    for (; j + VecS::size() <= n; j += VecS::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VecS::loadu(src + j));
      lo.store(dst + j);
      hi.store(dst + j + VecA::size());
    }
  }
  for (; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
}

// dst[j] = scalar_t(src[j] * f + b) for j in [0, n).
template <typename scalar_t, typename acc_t>
inline void affine_store(const acc_t* src, acc_t f, acc_t b, scalar_t* dst, int64_t n) {
  using VecS = Vectorized<scalar_t>;
  using VecA = Vectorized<acc_t>;
  const VecA vf(f), vb(b);
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; j + VecA::size() <= n; j += VecA::size()) {
      at::vec::fmadd(VecA::loadu(src + j), vf, vb).store(dst + j);
    }
  } else if constexpr (VecS::size() == 2 * VecA::size()) {
    for (; j + VecS::size() <= n; j += VecS::size()) {
      VecA lo = at::vec::fmadd(VecA::loadu(src + j), vf, vb);
      VecA hi = at::vec::fmadd(VecA::loadu(src + j + VecA::size()), vf, vb);
      at::vec::convert_from_float<scalar_t>(lo, hi).store(dst + j);
    }
  }
  for (; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j] * f + b);
}

// One row of the forward.
//   lse = log sum_j exp(x_j), computed online chunk by chunk: each chunk's max m_c and sum s_c = sum exp(x - m_c),
//   merged into the running (M, S) with one scalar exp per chunk, so the row is read from memory once.
//   loss = lse - (1 - eps) x_t - eps mean_j x_j                     (eps = label smoothing)
//   grad = (softmax(x) - (1 - eps) onehot(t) - eps / V) / count     (the VJP of the mean loss, for grad_output 1)
// The exps e_j = exp(x_j - m_c) go to `scratch` (one row of acc_t per thread, L2-resident), so the gradient pass
// needs no second exp: softmax_j = e_j * exp(m_c - lse).
// grad_t is scalar_t, or float for float16 logits (see grad_dtype in ops.cpp: fp16 gradients of a mean over many
// rows fall below fp16's smallest subnormal before the loss scale multiplies them).
template <typename scalar_t, typename acc_t, typename grad_t>
acc_t ce_row(const scalar_t* x, int64_t V, int64_t t, acc_t smoothing, acc_t inv_count, acc_t* scratch,
             acc_t* chunk_max, grad_t* grad) {
  using VecA = Vectorized<acc_t>;
  constexpr int64_t W = VecA::size();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t M = neg_inf, S = 0, sum_x = 0;
  int64_t c = 0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk, ++c) {
    const int64_t n = std::min(kChunk, V - c0);
    const acc_t* src;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      src = x + c0;
    } else {
      to_acc(x + c0, scratch + c0, n);
      src = scratch + c0;
    }
    // chunk max
    VecA vmax(neg_inf);
    int64_t j = 0;
    for (; j + W <= n; j += W) vmax = at::vec::maximum(vmax, VecA::loadu(src + j));
    acc_t mc = at::vec::vec_reduce_all<acc_t>([](VecA& a, VecA& b) { return at::vec::maximum(a, b); }, vmax);
    for (; j < n; ++j) mc = std::max(mc, src[j]);
    // chunk sum of exp(x - mc), exps kept in scratch
    acc_t sc = 0, sx = 0;
    if (mc == neg_inf) {
      // the whole chunk is -inf: it adds nothing (and exp(-inf - -inf) would be NaN)
      std::fill(scratch + c0, scratch + c0 + n, acc_t(0));
    } else {
      VecA vsum(0), vsx(0);
      const VecA vm(mc);
      for (j = 0; j + W <= n; j += W) {
        VecA xv = VecA::loadu(src + j);
        VecA e = vexp<acc_t>(xv - vm);
        e.store(scratch + c0 + j);
        vsum = vsum + e;
        vsx = vsx + xv;
      }
      sc = at::vec::vec_reduce_all<acc_t>([](VecA& a, VecA& b) { return a + b; }, vsum);
      sx = at::vec::vec_reduce_all<acc_t>([](VecA& a, VecA& b) { return a + b; }, vsx);
      for (; j < n; ++j) {
        acc_t e = std::exp(src[j] - mc);
        scratch[c0 + j] = e;
        sc += e;
        sx += src[j];
      }
    }
    chunk_max[c] = mc;
    sum_x += sx;
    if (mc > M) {
      S = (M == neg_inf ? acc_t(0) : S * std::exp(M - mc)) + sc;
      M = mc;
    } else if (mc != neg_inf) {
      S += sc * std::exp(mc - M);
    }
  }
  const acc_t lse = M + std::log(S);
  const acc_t xt = static_cast<acc_t>(x[t]);
  acc_t loss = lse - (acc_t(1) - smoothing) * xt;
  if (smoothing != acc_t(0)) loss -= smoothing * sum_x / static_cast<acc_t>(V);

  if (grad != nullptr) {
    const acc_t b = -smoothing / static_cast<acc_t>(V) * inv_count;
    c = 0;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk, ++c) {
      const int64_t n = std::min(kChunk, V - c0);
      const acc_t f = chunk_max[c] == neg_inf ? acc_t(0) : std::exp(chunk_max[c] - lse) * inv_count;
      affine_store<grad_t, acc_t>(scratch + c0, f, b, grad + c0, n);
    }
    // the target element, from the float softmax (one rounding, as for every other element)
    const int64_t ct = t / kChunk;
    const acc_t pt = chunk_max[ct] == neg_inf ? acc_t(0) : scratch[t] * std::exp(chunk_max[ct] - lse);
    grad[t] = static_cast<grad_t>((pt - (acc_t(1) - smoothing)) * inv_count + b);
  }
  return loss;
}

template <typename scalar_t, typename grad_t>
void ce_forward_impl(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double smoothing,
                     int64_t count, const at::Tensor& row_loss, const at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t ld = logits.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  acc_t* out = row_loss.data_ptr<acc_t>();
  grad_t* g = grad.defined() ? grad.data_ptr<grad_t>() : nullptr;
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(count, 1));
  const acc_t eps = static_cast<acc_t>(smoothing);
  // grain: enough rows that a task holds ~32K elements (one row of a BERT vocabulary is one task)
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(V);
    std::vector<acc_t> chunk_max((V + kChunk - 1) / kChunk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = tgt[r];
      grad_t* gr = g ? g + r * V : nullptr;
      if (t == ignore_index) {
        out[r] = 0;
        if (gr) std::fill(gr, gr + V, grad_t(0));
        continue;
      }
      out[r] = ce_row<scalar_t, acc_t, grad_t>(x + r * ld, V, t, eps, inv_count, scratch.data(), chunk_max.data(),
                                               gr);
    }
  });
}

template <typename scalar_t>
void scale_impl(const at::Tensor& grad, double s) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* g = grad.data_ptr<scalar_t>();
  const acc_t f = static_cast<acc_t>(s);
  at::parallel_for(0, grad.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    using VecS = Vectorized<scalar_t>;
    using VecA = Vectorized<acc_t>;
    int64_t j = begin;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (; j + VecA::size() <= end; j += VecA::size()) (VecA::loadu(g + j) * VecA(f)).store(g + j);
    } else if constexpr (VecS::size() == 2 * VecA::size()) {
      for (; j + VecS::size() <= end; j += VecS::size()) {
        auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VecS::loadu(g + j));
        at::vec::convert_from_float<scalar_t>(lo * VecA(f), hi * VecA(f)).store(g + j);
      }
    }
    for (; j < end; ++j) g[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) * f);
  });
}

}  // namespace

void ce_forward(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double smoothing,
                int64_t count, const at::Tensor& row_loss, const at::Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_cross_entropy_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half>) {
      if (grad.defined() && grad.scalar_type() == at::kFloat) {
        ce_forward_impl<scalar_t, float>(logits, target, ignore_index, smoothing, count, row_loss, grad);
        return;
      }
    }
    TORCH_CHECK(!grad.defined() || grad.scalar_type() == logits.scalar_type(),
                "softmax_cross_entropy: internal error, gradient buffer of dtype ", grad.scalar_type(), " for ",
                logits.scalar_type(), " logits");
    ce_forward_impl<scalar_t, scalar_t>(logits, target, ignore_index, smoothing, count, row_loss, grad);
  });
}

void scale_(const at::Tensor& grad, double s) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "softmax_cross_entropy_scale_cpu",
                                  [&] { scale_impl<scalar_t>(grad, s); });
}

}  // namespace BERTFAST_CPU_NS
}  // namespace bertfast

#endif  // BERTFAST_CPU_NS
