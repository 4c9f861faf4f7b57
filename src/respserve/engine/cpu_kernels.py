"""Our own CPU kernels (kernels/*.cpp and *.h), compiled on first use and kept for later starts.

Four, for what no library here does well enough on a small CPU:
- `torch.ops.respserve.bf16_linear` (kernels/bf16_linear.cpp): float32 activations times bfloat16-stored
  weights, in float32. oneDNN multiplies bf16 weights only by bf16 activations, and on CPUs without
  AVX-512 it emulates that (packed_linear.py says when the weights qualify).
- `torch.ops.respserve.paged_decode_attention` (kernels/paged_attention.cpp): decode rows' attention read
  in place from the KV pool through their slots, instead of gathering the keys and values and calling
  SDPA with a mask (paged_attention.py).
- `torch.ops.respserve.paged_chunk_attention` (kernels/chunk_attention.cpp): a prompt chunk's causal
  attention over its sequence's keys in the pool, instead of gathering them for SDPA with a mask.
- `torch.ops.respserve.rms_norm` (kernels/rms_norm.cpp): an RMSNorm in one call instead of eight tensor
  ops (fused_norms.py says which norms it stands in for).

The first three run with AVX-512 where the CPU has it, else with AVX2, and the matmul and the chunk
attention on AMX tiles where the CPU has those (kernels/isa.h, kernels/amx_linear.cpp,
kernels/amx_attention.cpp). `torch.ops.respserve.kernel_isa()` says which (amx, avx512 or avx2);
`RESPSERVE_CPU_KERNEL_ISA=avx512` or `avx2` asks for a narrower one.

They are built with the machine's C++ compiler (`CXX`, else `c++`) against the running torch, into one
library in `<cache dir>/kernels`, named by a hash of the sources, the flags and torch's version: a change
builds anew, and servers starting together never load a half-written file (each compiles to a file of
its own, renamed into place); one source compiles per core. Without a working compiler, or on a CPU
without AVX2 and FMA, nothing is built and the engine runs as it does without them (oneDNN-packed float32
weights, SDPA, transformers' norms); the log says why.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

SOURCES = tuple(sorted(Path(__file__).with_name("kernels").glob("*.cpp")))
HEADERS = tuple(sorted(Path(__file__).with_name("kernels").glob("*.h")))
# -fopenmp: at::parallel_for splits the work over torch's own OpenMP threads (the process's libgomp).
_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++17", "-fPIC")
_LIBRARIES = ("-lc10", "-ltorch_cpu")
_BUILD_TIMEOUT_S = 300


@functools.cache
def load_cpu_kernels(kernel_dir: Path) -> bool:
    """Whether the `torch.ops.respserve` kernels are loaded, building them into `kernel_dir` if need be."""
    reason = _unbuildable()
    if reason is None:
        try:
            torch.ops.load_library(str(_built(kernel_dir)))
            logger.info("respserve's CPU kernels are loaded (%s)", torch.ops.respserve.kernel_isa())
            return True
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            reason = str(error)
    logger.warning("respserve's CPU kernels are not available (%s); the engine runs without them", reason)
    return False


def _unbuildable() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are written for x86-64, this CPU is {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2"
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler ({_compiler()}) on the PATH"
    return None


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compile(source: Path, output: Path) -> list[str]:
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    return [_compiler(), *_FLAGS, abi, *includes, "-c", str(source), "-o", str(output)]


def _link(objects: list[Path], output: Path) -> list[str]:
    libraries = [f"-L{path}" for path in cpp_extension.library_paths()]
    return [_compiler(), "-shared", "-fopenmp", *map(str, objects), "-o", str(output), *libraries, *_LIBRARIES]


def _run(commands: list[list[str]]) -> None:
    """Runs the commands at once (one source per core), raising with the compiler's words if one fails."""
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for command in commands]
    try:
        errors = [process.communicate(timeout=_BUILD_TIMEOUT_S)[1] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, error in zip(processes, errors, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"{_compiler()} failed: {error.strip()[-600:]}")


def _built(kernel_dir: Path) -> Path:
    """The shared library for these sources, flags and torch, compiled now unless an earlier start did."""
    key = hashlib.sha256(" ".join((*_FLAGS, torch.__version__, sys.version)).encode())
    for source in (*SOURCES, *HEADERS):
        key.update(source.read_bytes())
    library = kernel_dir / f"respserve_cpu-{key.hexdigest()[:16]}.so"
    if library.is_file():
        return library
    kernel_dir.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.partial")
    objects = [partial.with_name(f"{partial.name}.{source.stem}.o") for source in SOURCES]
    logger.info("compiling respserve's CPU kernels into %s (once, about 20 s)", library)
    try:
        _run([_compile(source, obj) for source, obj in zip(SOURCES, objects, strict=True)])
        _run([_link(objects, partial)])
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        for obj in objects:
            obj.unlink(missing_ok=True)
    os.replace(partial, library)
    for stale in kernel_dir.glob("respserve_cpu-*.so"):  # earlier sources' builds (a loaded one stays mapped)
        if stale != library:
            stale.unlink(missing_ok=True)
    return library
