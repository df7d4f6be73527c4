// The AVX2+FMA build of the CPU loss kernels (see cpu_kernels.h), for x86-64 with GCC. The extension is compiled
// without -mavx2, so at::vec would fall back to scalar loops (and std::exp per element); here the target pragma
// switches AVX2 on for this translation unit only and CPU_CAPABILITY_AVX2 selects at::vec's 256-bit
// implementation (inside its own CPU_CAPABILITY namespace, AVX2, as in PyTorch's own per-capability kernels).
// ops.cpp calls these only when the running CPU has AVX2 and FMA (cpu_has_avx2()). Elsewhere (other compilers,
// other architectures) this file only defines stubs and the portable build runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__AVX2__)
#pragma GCC target("avx2,fma,f16c")
// GCC's target pragma enables the instructions but not the feature macros that sleef.h and at::vec test for.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define BERTFAST_HAVE_AVX2_TU 1
#elif defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
// already compiled for AVX2 (e.g. -march=native): at::vec picks it up from the flags
#define BERTFAST_HAVE_AVX2_TU 1
#endif

#ifdef BERTFAST_HAVE_AVX2_TU
#define BERTFAST_CPU_NS cpu_avx2
#include "cpu_kernels.h"
namespace bertfast {
namespace cpu_avx2 {
bool compiled() { return true; }
}  // namespace cpu_avx2
}  // namespace bertfast
#else
#include "cpu_kernels.h"
namespace bertfast {
namespace cpu_avx2 {
bool compiled() { return false; }
void ce_forward(const at::Tensor&, const at::Tensor&, int64_t, double, int64_t, const at::Tensor&,
                const at::Tensor&) {
  TORCH_CHECK(false, "bertfast: the AVX2 CPU kernels were not compiled in");
}
void scale_(const at::Tensor&, double) { TORCH_CHECK(false, "bertfast: the AVX2 CPU kernels were not compiled in"); }
}  // namespace cpu_avx2
}  // namespace bertfast
#endif
