// The choice isa.h declares, and `torch.ops.respserve.kernel_isa()`, which tells it (the server logs it and
// the tests compare the two paths in processes of their own).

#include "isa.h"

#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace respserve {

bool use_avx512() {
  static const bool chosen = [] {
    const char* asked = std::getenv("RESPSERVE_CPU_KERNEL_ISA");
    if (asked != nullptr && std::strcmp(asked, "avx2") == 0) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  }();
  return chosen;
}

}  // namespace respserve

namespace {

std::string kernel_isa() { return respserve::use_avx512() ? "avx512" : "avx2"; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(respserve, m) { m.def("kernel_isa() -> str", &kernel_isa); }
