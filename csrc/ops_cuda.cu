// CUDA kernels of bertfast's operators (schemas in ops.cpp). Launched on the current stream, float32 accumulation
// (at::opmath_type), no host-device synchronisation anywhere (counts stay on the device).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10's stream header, not ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE headers, which a bare CUDA
// toolkit (the project's build machines) lacks. c10::cuda::getCurrentCUDAStream is what at::cuda's alias returns.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "checks.h"

namespace bertfast {
namespace {

constexpr int kWarp = 32;

// VEC contiguous elements moved as one 16-byte (or smaller) memory transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// ------------------------------------------------------------------------------------------------------------------
// mlm_gather: out[b*P + p] = hidden[b, positions[b, p]] (zeros for -1). A pure row copy: moved in units of U
// (uint4 = 16 bytes where the row size, strides and pointers allow), so one kernel serves every dtype.
// ------------------------------------------------------------------------------------------------------------------
template <typename U>
__global__ void mlm_gather_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                  const int64_t* __restrict__ pos, int64_t P, int64_t S, int64_t stride_b,
                                  int64_t stride_s, int64_t units_per_row) {
  const int64_t i = blockIdx.x;  // output row = b * P + p
  const int64_t b = i / P;
  const int64_t s = pos[i];
  CUDA_KERNEL_ASSERT(s >= -1 && s < S && "mlm_gather: positions must be -1 or in [0, seqlen)");
  U* out = reinterpret_cast<U*>(dst) + i * units_per_row;
  if (s < 0) {
    U zero;
    memset(&zero, 0, sizeof(U));
    for (int64_t k = threadIdx.x; k < units_per_row; k += blockDim.x) out[k] = zero;
    return;
  }
  const U* in = reinterpret_cast<const U*>(src + b * stride_b + s * stride_s);
  for (int64_t k = threadIdx.x; k < units_per_row; k += blockDim.x) out[k] = in[k];
}

// grad_hidden[b, s] = sum over slots p of batch b with positions[b, p] == s of grad[b*P + p] (float accumulation).
// Linear in P: `sorted` / `order` are each batch row's positions stably sorted (at::sort), so the slots holding one
// position form a run, in ascending slot order. One block per sorted slot; the block at the head of a run sums the
// run's rows of grad and writes the row once, the others exit. Deterministic (no atomics; the same summation order
// as the CPU kernel). grad_hidden is zero-filled before.
template <typename scalar_t>
__global__ void mlm_gather_backward_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ sorted,
                                           const int64_t* __restrict__ order, scalar_t* __restrict__ out, int64_t P,
                                           int64_t S, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x;
  const int64_t b = i / P, p = i % P;
  const int64_t* sb = sorted + b * P;
  const int64_t* ob = order + b * P;
  const int64_t s = sb[p];
  CUDA_KERNEL_ASSERT(s >= -1 && s < S && "mlm_gather_backward: positions must be -1 or in [0, seqlen)");
  if (s < 0 || (p > 0 && sb[p - 1] == s)) return;  // unused slot, or not the head of its run
  int64_t end = p + 1;
  while (end < P && sb[end] == s) ++end;
  scalar_t* orow = out + (b * S + s) * H;
  const scalar_t* gb = grad + b * P * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    acc_t acc = 0;
    for (int64_t q = p; q < end; ++q) acc += static_cast<acc_t>(gb[ob[q] * H + h]);
    orow[h] = static_cast<scalar_t>(acc);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// softmax cross-entropy
// ------------------------------------------------------------------------------------------------------------------

// Online log-sum-exp state: m = running max, s = sum exp(x - m), sx = sum x (for label smoothing).
struct LseState {
  float m, s, sx;
};

__device__ __forceinline__ LseState lse_merge(LseState a, LseState b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f, a.sx + b.sx};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m), a.sx + b.sx};
}

template <int WIDTH>
__device__ __forceinline__ LseState warp_merge(LseState v) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off /= 2) {
    LseState o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
               __shfl_xor_sync(0xffffffffu, v.sx, off)};
    v = lse_merge(v, o);
  }
  return v;
}

__device__ __forceinline__ void lse_add(LseState& st, float x) {
  if (x > st.m) {
    st.s = st.s * __expf(st.m - x) + 1.f;  // exp(-inf) = 0 covers the first element
    st.m = x;
  } else if (x != -INFINITY) {
    st.s += __expf(x - st.m);
  }
  st.sx += x;
}

// One row per TPR threads (TPR = 32: a warp per row, BLOCK / 32 rows per block, for small vocabularies;
// TPR = BLOCK: the whole block on one row, for large ones).
//   pass 1 reads the row once: per-thread online (max, sum exp) over 16-byte vectors, merged across the row's
//          threads: lse = m + log s;  loss = lse - (1 - eps) x_t - eps mean(x)
//   pass 2 (when grad is wanted) writes grad = (softmax - (1 - eps) onehot(t) - eps / V) / count, the gradient for
//          grad_output = 1, re-reading the row (mostly from L2, which the row just went through).
// Ignored rows get loss 0 and a zero gradient row. count = number of kept rows, read from device memory.
// grad_t: scalar_t, or float for half logits (see grad_dtype in checks.h).
template <typename scalar_t, typename grad_t, int VEC, int TPR, int BLOCK, int UNROLL>
__global__ void __launch_bounds__(BLOCK)
    ce_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                      const int64_t* __restrict__ count, float* __restrict__ row_loss, grad_t* __restrict__ grad,
                      int64_t N, int64_t V, int64_t ld, int64_t ignore_index, float eps) {
  constexpr int ROWS = BLOCK / TPR;
  constexpr int WARPS_PER_ROW = TPR / kWarp;
  __shared__ LseState smem[BLOCK / kWarp];
  __shared__ LseState row_state[ROWS];

  const int lane = threadIdx.x % TPR;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / TPR;
  if (TPR == BLOCK && r >= N) return;  // whole block uniform
  const bool active = r < N;           // (TPR < BLOCK: warp-uniform)
  if (!active) return;

  const scalar_t* x = logits + r * ld;
  grad_t* g = grad == nullptr ? nullptr : grad + r * V;
  const int64_t t = target[r];
  if (t == ignore_index) {
    if (lane == 0) row_loss[r] = 0.f;
    if (g != nullptr) {
      for (int64_t j = lane; j < V; j += TPR) g[j] = grad_t(0);
    }
    return;
  }
  CUDA_KERNEL_ASSERT(t >= 0 && t < V && "softmax_cross_entropy: target out of range [0, vocab)");

  // head (unaligned prefix), body (aligned 16-byte vectors), tail
  const int misalign = static_cast<int>((reinterpret_cast<uintptr_t>(x) / sizeof(scalar_t)) % VEC);
  const int64_t head = misalign == 0 ? 0 : min(static_cast<int64_t>(VEC - misalign), V);
  const int64_t nvec = (V - head) / VEC;
  const int64_t tail0 = head + nvec * VEC;
  using P = Pack<scalar_t, VEC>;
  const P* xv = reinterpret_cast<const P*>(x + head);

  LseState st{-INFINITY, 0.f, 0.f};
  for (int64_t j = lane; j < head; j += TPR) lse_add(st, static_cast<float>(x[j]));
  int64_t k = lane;
  for (; k + (UNROLL - 1) * TPR < nvec; k += UNROLL * TPR) {
    P buf[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) buf[u] = xv[k + u * TPR];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float f[VEC];
      float mv = -INFINITY, sx = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        f[e] = static_cast<float>(buf[u].v[e]);
        mv = fmaxf(mv, f[e]);
        sx += f[e];
      }
      st.sx += sx;
      if (mv == -INFINITY) continue;
      if (mv > st.m) {
        st.s *= __expf(st.m - mv);
        st.m = mv;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) st.s += __expf(f[e] - st.m);
    }
  }
  for (; k < nvec; k += TPR) {
    const P p = xv[k];
#pragma unroll
    for (int e = 0; e < VEC; ++e) lse_add(st, static_cast<float>(p.v[e]));
  }
  for (int64_t j = tail0 + lane; j < V; j += TPR) lse_add(st, static_cast<float>(x[j]));

  // merge across the row's threads
  st = warp_merge<kWarp>(st);
  if constexpr (WARPS_PER_ROW > 1) {
    const int warp = threadIdx.x / kWarp;
    if (threadIdx.x % kWarp == 0) smem[warp] = st;
    __syncthreads();
    if (warp == 0) {
      LseState v = threadIdx.x < WARPS_PER_ROW ? smem[threadIdx.x] : LseState{-INFINITY, 0.f, 0.f};
      v = warp_merge<kWarp>(v);
      if (threadIdx.x == 0) row_state[0] = v;
    }
    __syncthreads();
    st = row_state[0];
  }
  const float lse = st.m + __logf(st.s);
  const float xt = static_cast<float>(x[t]);
  if (lane == 0) row_loss[r] = lse - (1.f - eps) * xt - eps * st.sx / static_cast<float>(V);
  if (g == nullptr) return;

  const float inv_count = 1.f / static_cast<float>(max(*count, int64_t(1)));
  const float b = -eps / static_cast<float>(V) * inv_count;
  const float hit = (1.f - eps) * inv_count;
  auto grad_at = [&](float xj, int64_t j) { return __expf(xj - lse) * inv_count + b - (j == t ? hit : 0.f); };
  for (int64_t j = lane; j < head; j += TPR) g[j] = static_cast<grad_t>(grad_at(static_cast<float>(x[j]), j));
  // grad rows are contiguous (stride V), so their alignment can differ from the logits rows' (stride ld, any V)
  using PG = Pack<grad_t, VEC>;
  const bool g_aligned = (reinterpret_cast<uintptr_t>(g + head) % sizeof(PG)) == 0;
  for (k = lane; k < nvec; k += TPR) {
    const P p = xv[k];
    PG out;
    const int64_t j0 = head + k * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) out.v[e] = static_cast<grad_t>(grad_at(static_cast<float>(p.v[e]), j0 + e));
    if (g_aligned) {
      *reinterpret_cast<PG*>(g + j0) = out;
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) g[j0 + e] = out.v[e];
    }
  }
  for (int64_t j = tail0 + lane; j < V; j += TPR) g[j] = static_cast<grad_t>(grad_at(static_cast<float>(x[j]), j));
}

// grad *= grad_output[0] (float math, one rounding), 16-byte vectors over a contiguous buffer.
template <typename scalar_t, int VEC>
__global__ void scale_kernel(scalar_t* __restrict__ g, const float* __restrict__ go, int64_t n) {
  using P = Pack<scalar_t, VEC>;
  const float f = *go;
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  P* gv = reinterpret_cast<P*>(g);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    P p = gv[i];
#pragma unroll
    for (int e = 0; e < VEC; ++e) p.v[e] = static_cast<scalar_t>(static_cast<float>(p.v[e]) * f);
    gv[i] = p;
  }
  for (int64_t i = nvec * VEC + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    g[i] = static_cast<scalar_t>(static_cast<float>(g[i]) * f);
  }
}

template <typename scalar_t>
__global__ void scale_kernel_f64(scalar_t* __restrict__ g, const double* __restrict__ go, int64_t n) {
  const double f = *go;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) g[i] *= f;
}

// ------------------------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------------------------

int max_blocks() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms * 8;
}

at::Tensor mlm_gather_cuda(const at::Tensor& hidden_in, const at::Tensor& positions_in) {
  check_gather_args(hidden_in, positions_in);
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.stride(-1) == 1 ? hidden_in : hidden_in.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  const int64_t B = hidden.size(0), S = hidden.size(1), H = hidden.size(2), P = positions.size(1);
  at::Tensor out = at::empty({B * P, H}, hidden.options());
  if (out.numel() == 0) return out;
  const int64_t es = hidden.element_size();
  const int64_t row_bytes = H * es, sb = hidden.stride(0) * es, ss = hidden.stride(1) * es;
  const auto src = reinterpret_cast<uintptr_t>(hidden.const_data_ptr());
  const auto dst = reinterpret_cast<uintptr_t>(out.data_ptr());
  auto fits = [&](int64_t u) {
    return row_bytes % u == 0 && sb % u == 0 && ss % u == 0 && src % u == 0 && dst % u == 0;
  };
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto unit) {
    using U = decltype(unit);
    const int64_t units = row_bytes / static_cast<int64_t>(sizeof(U));
    const int threads = static_cast<int>(std::min<int64_t>(256, ((units + 31) / 32) * 32));
    mlm_gather_kernel<U><<<static_cast<unsigned>(B * P), threads, 0, stream>>>(
        static_cast<const char*>(hidden.const_data_ptr()), static_cast<char*>(out.data_ptr()),
        positions.const_data_ptr<int64_t>(), P, S, sb, ss, units);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (fits(16)) launch(uint4{});
  else if (fits(8)) launch(uint2{});
  else if (fits(4)) launch(uint32_t{});
  else launch(uint16_t{});
  return out;
}

at::Tensor mlm_gather_backward_cuda(const at::Tensor& grad_in, const at::Tensor& positions_in, int64_t S) {
  check_gather_backward_args(grad_in, positions_in, S);
  const int64_t B = positions_in.size(0), P = positions_in.size(1), H = grad_in.size(1);
  c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::zeros({B, S, H}, grad.options());
  if (out.numel() == 0 || P == 0) return out;
  // each batch row's positions in ascending order, ties in slot order (stable): the runs the kernel sums
  const auto sorted_order = at::sort(positions_in, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor sorted = std::get<0>(sorted_order).contiguous();
  const at::Tensor order = std::get<1>(sorted_order).contiguous();
  const int threads = static_cast<int>(std::min<int64_t>(256, ((H + 31) / 32) * 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mlm_gather_backward_cuda", [&] {
    mlm_gather_backward_kernel<scalar_t><<<static_cast<unsigned>(B * P), threads, 0,
                                           c10::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), sorted.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), P, S, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t, typename grad_t>
void launch_ce_forward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& count,
                       const at::Tensor& row_loss, grad_t* grad, int64_t ignore_index, float eps) {
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  constexpr int VEC = 16 / sizeof(scalar_t);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const int64_t* c = count.const_data_ptr<int64_t>();
  float* out = row_loss.data_ptr<float>();
  if (V <= 2048) {
    // small vocabulary: a warp per row, 8 rows per block
    constexpr int BLOCK = 256, TPR = 32;
    const int64_t blocks = (N + BLOCK / TPR - 1) / (BLOCK / TPR);
    ce_forward_kernel<scalar_t, grad_t, VEC, TPR, BLOCK, 2><<<static_cast<unsigned>(blocks), BLOCK, 0, stream>>>(
        x, t, c, out, grad, N, V, ld, ignore_index, eps);
  } else {
    // large vocabulary (BERT's 30522): a block per row
    constexpr int BLOCK = 512;
    ce_forward_kernel<scalar_t, grad_t, VEC, BLOCK, BLOCK, 4><<<static_cast<unsigned>(N), BLOCK, 0, stream>>>(
        x, t, c, out, grad, N, V, ld, ignore_index, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy_cuda(const at::Tensor& logits_in,
                                                              const at::Tensor& target_in, int64_t ignore_index,
                                                              double label_smoothing, bool compute_grad) {
  check_ce_args(logits_in, target_in, label_smoothing);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  at::Tensor count = target.ne(ignore_index).sum();  // int64 on the device: no host sync
  at::Tensor grad = compute_grad ? at::empty({N, V}, logits.options().dtype(grad_dtype(logits.scalar_type())))
                                 : at::empty({0}, logits.options());
  at::Tensor row_loss = at::empty({N}, logits.options().dtype(at::kFloat));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_cross_entropy_cuda", [&] {
      using grad_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, float, scalar_t>;  // grad_dtype
      launch_ce_forward<scalar_t, grad_t>(logits, target, count, row_loss,
                                          compute_grad ? grad.data_ptr<grad_t>() : nullptr, ignore_index,
                                          static_cast<float>(label_smoothing));
    });
  }
  // sum of the kept rows' losses / max(count, 1): 0 when every row is ignored
  at::Tensor loss = row_loss.sum().div(count.clamp_min(1)).to(acc_dtype);
  return {loss, grad};
}

void softmax_cross_entropy_backward_cuda(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_ce_backward_args(grad, grad_output);
  const int64_t n = grad.numel();
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(grad.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  if (grad.scalar_type() == at::kDouble) {
    const at::Tensor go = grad_output.to(grad.device(), at::kDouble);
    const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, max_blocks()));
    scale_kernel_f64<double><<<blocks, threads, 0, stream>>>(grad.data_ptr<double>(), go.const_data_ptr<double>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const at::Tensor go = grad_output.to(grad.device(), at::kFloat);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(grad.data_ptr()) % 16 == 0, "softmax_cross_entropy_backward_: grad_logits must be 16-byte aligned");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "softmax_cross_entropy_scale_cuda", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    const int blocks = static_cast<int>(std::min<int64_t>((n / VEC + threads - 1) / threads + 1, max_blocks()));
    scale_kernel<scalar_t, VEC><<<blocks, threads, 0, stream>>>(grad.data_ptr<scalar_t>(), go.const_data_ptr<float>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(bertfast, CUDA, m) {
  m.impl("mlm_gather", &mlm_gather_cuda);
  m.impl("mlm_gather_backward", &mlm_gather_backward_cuda);
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_cuda);
  m.impl("softmax_cross_entropy_backward_", &softmax_cross_entropy_backward_cuda);
}

}  // namespace bertfast
