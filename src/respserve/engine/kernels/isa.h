// Which vector instructions the kernels run with, chosen once per process (isa.cpp).
#pragma once

namespace respserve {

// AVX-512 (F and BW) where the CPU has them, unless RESPSERVE_CPU_KERNEL_ISA=avx2; else AVX2 and FMA,
// which every build assumes (cpu_kernels.py builds nothing on CPUs without them).
bool use_avx512();

// AMX (tiles and their bf16 dot products) for the bf16 matmul and the prompt-chunk attention, where the
// CPU has it, the compiler knows it and the kernel lets this process use the tile registers, unless
// RESPSERVE_CPU_KERNEL_ISA names avx512 or avx2. Only with AVX-512: every CPU with AMX has it.
bool use_amx();

}  // namespace respserve

// For the functions compiled for AVX-512 beside the AVX2 build of the rest.
#define RESPSERVE_AVX512 __attribute__((target("avx512f,avx512bw")))

// GCC 11 and clang 12 were the first to know AMX's intrinsics.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define RESPSERVE_HAVE_AMX 1
#define RESPSERVE_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#else
#define RESPSERVE_HAVE_AMX 0
#endif
