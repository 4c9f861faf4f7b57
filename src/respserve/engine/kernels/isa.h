// Which vector instructions the kernels run with, chosen once per process (isa.cpp).
#pragma once

namespace respserve {

// AVX-512 (F and BW) where the CPU has them, unless RESPSERVE_CPU_KERNEL_ISA=avx2; else AVX2 and FMA,
// which every build assumes (cpu_kernels.py builds nothing on CPUs without them).
bool use_avx512();

}  // namespace respserve

// For the functions compiled for AVX-512 beside the AVX2 build of the rest.
#define RESPSERVE_AVX512 __attribute__((target("avx512f,avx512bw")))
