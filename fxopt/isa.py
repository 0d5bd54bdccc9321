"""The instruction sets of the machine fxopt runs on, and a fingerprint of it for caches.

What is fastest depends on the hardware: an AMX tile unit turns bfloat16 and int8 GEMMs into
a different kind of problem than AVX-512 VNNI, AVX2 or ARM NEON/SVE. :func:`detect` reads
what this machine has from PyTorch (``torch.backends.cpu.get_cpu_capability()``, the CUDA
device), ``/proc/cpuinfo`` (Linux) and :mod:`platform`; recipes and kernel choices read the
:class:`Isa` instead of assuming a CPU. :func:`fingerprint` is the key under which measured
kernel timings are cached (see :mod:`fxopt.pipeline.timings`): timings from another CPU,
another PyTorch or another thread count are never reused.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# The /proc/cpuinfo flags that decide which GEMM kernels a CPU runs, in the order they are
# named in a fingerprint.
RELEVANT_FLAGS = (
    "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "avx2", "fma", "f16c",
    "asimd", "asimddp", "asimdhp", "bf16", "i8mm", "sve", "sve2",
)


# The Isa properties that name a GEMM unit ("none" where the CPU would emulate the arithmetic),
# which a preset's candidate may require (fxopt.presets.Candidate.cpu_unit).
GEMM_UNITS = ("int8_gemm", "bf16_gemm")


@dataclass(frozen=True)
class Isa:
    """What this machine's GEMMs can run on."""

    cpu_model: str
    machine: str  # platform.machine(): "x86_64", "aarch64", "arm64", ...
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "SVE256", "DEFAULT", ...
    flags: frozenset[str]  # the RELEVANT_FLAGS this CPU reports
    cuda_device: str | None = None  # the current CUDA device's name, when CUDA is available

    @property
    def amx_bf16(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def amx_int8(self) -> bool:
        return "amx_int8" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags or self.capability.startswith("AVX512")

    @property
    def avx512_vnni(self) -> bool:
        return "avx512_vnni" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def avx512_fp16(self) -> bool:
        return "avx512_fp16" in self.flags

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags or self.capability in ("AVX2", "AVX512") or self.avx512

    @property
    def arm(self) -> bool:
        return self.machine.lower() in ("aarch64", "arm64") or "asimd" in self.flags

    @property
    def neon(self) -> bool:
        return self.arm  # every AArch64 CPU has NEON (Advanced SIMD)

    @property
    def sve(self) -> bool:
        return "sve" in self.flags or self.capability.startswith("SVE")

    @property
    def int8_gemm(self) -> str:
        """The fastest int8 GEMM unit: "amx", "avx512-vnni", "avx-vnni", "arm-i8mm", "arm-dot",
        "avx2" or "none" (no integer dot product: int8 rarely beats float there)."""
        if self.amx_int8:
            return "amx"
        if self.avx512_vnni:
            return "avx512-vnni"
        if "avx_vnni" in self.flags:
            return "avx-vnni"
        if "i8mm" in self.flags:
            return "arm-i8mm"
        if "asimddp" in self.flags:
            return "arm-dot"
        return "avx2" if self.avx2 else "none"

    @property
    def bf16_gemm(self) -> str:
        """The bfloat16 GEMM unit: "amx", "avx512-bf16", "arm-bf16" or "none" (emulated)."""
        if self.amx_bf16:
            return "amx"
        if self.avx512_bf16:
            return "avx512-bf16"
        if self.arm and "bf16" in self.flags:
            return "arm-bf16"
        return "none"

    def summary(self) -> str:
        """One line for reports and benchmarks: the CPU, its vector unit and its GEMM units."""
        line = (f"{self.cpu_model} ({self.machine}, {self.capability}; int8 GEMM: {self.int8_gemm}, "
                f"bf16 GEMM: {self.bf16_gemm})")
        return line + (f"; CUDA: {self.cuda_device}" if self.cuda_device else "")


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The CPU model and its flags, from the text of ``/proc/cpuinfo`` (x86: "model name",
    "flags"; ARM: "Features", and "CPU part" when there is no model name)."""
    model, flags, part = "", set(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "cpu part" and not part:
            part = value.strip()
    if not model and part:
        model = f"ARM CPU part {part}"
    return model, frozenset(flags)


def from_parts(cpu_model: str, machine: str, capability: str, flags: Iterable[str],
               cuda_device: str | None = None) -> Isa:
    """An :class:`Isa` from what was read, keeping only the flags that decide GEMM kernels."""
    relevant = frozenset(flag for flag in flags if flag in RELEVANT_FLAGS)
    return Isa(cpu_model or platform.processor() or machine or "unknown CPU", machine, capability,
               relevant, cuda_device)


@functools.cache
def detect() -> Isa:
    """This machine's :class:`Isa` (read once per process: the hardware does not change)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            model, flags = parse_cpuinfo(file.read())
    except OSError:  # not Linux
        model, flags = "", frozenset()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # older PyTorch
        capability = "unknown"
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return from_parts(model, platform.machine(), capability, flags, cuda)


def fingerprint(isa: Isa | None = None, threads: int | None = None) -> str:
    """A stable string naming the machine a timing was measured on: CPU model and the flags
    that decide its kernels, the CUDA device, the PyTorch version and the thread count.
    Readable first, then a short hash of the whole, so a key never grows without bound."""
    isa = isa or detect()
    threads = torch.get_num_threads() if threads is None else threads
    parts = [isa.cpu_model, isa.machine, isa.capability, ",".join(sorted(isa.flags)) or "-",
             isa.cuda_device or "no-cuda", f"torch-{torch.__version__}", f"threads-{threads}"]
    whole = "|".join(parts)
    digest = hashlib.sha256(whole.encode()).hexdigest()[:12]
    return f"{isa.cpu_model} {isa.capability} torch-{torch.__version__} threads-{threads} {digest}"
