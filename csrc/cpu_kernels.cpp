// The portable build of the CPU loss kernels (see cpu_kernels.h).
#define BERTFAST_CPU_NS cpu_default
#include "cpu_kernels.h"
