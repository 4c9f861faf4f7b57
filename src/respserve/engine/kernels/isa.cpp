// The choice isa.h declares, and `torch.ops.respserve.kernel_isa()`, which tells it (the server logs it and
// the tests compare the paths in processes of their own).

#include "isa.h"

#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace respserve {

namespace {

bool asked_for(const char* isa) {
  const char* asked = std::getenv("RESPSERVE_CPU_KERNEL_ISA");
  return asked != nullptr && std::strcmp(asked, isa) == 0;
}

// Linux hands a process the tile registers' 8 KiB of state only once it asks (a tile instruction faults
// before); the grant holds for all its threads. oneDNN asks the same way where it uses AMX.
bool tile_data_granted() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace

bool use_avx512() {
  static const bool chosen =
      !asked_for("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return chosen;
}

bool use_amx() {
  static const bool chosen = [] {
#if RESPSERVE_HAVE_AMX
    return use_avx512() && !asked_for("avx512") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && tile_data_granted();
#else
    return false;
#endif
  }();
  return chosen;
}

}  // namespace respserve

namespace {

std::string kernel_isa() {
  if (respserve::use_amx()) return "amx";
  return respserve::use_avx512() ? "avx512" : "avx2";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(respserve, m) { m.def("kernel_isa() -> str", &kernel_isa); }
