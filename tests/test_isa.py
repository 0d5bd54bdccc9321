"""fxopt.isa: the instruction sets read from /proc/cpuinfo and PyTorch, and the fingerprint."""

from __future__ import annotations

import torch

from fxopt import isa

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""
EPYC = """model name\t: AMD EPYC 9654
flags\t\t: fpu avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes sha1 asimddp asimdhp bf16 i8mm sve sve2
CPU part\t: 0xd4f
"""
OLD_X86 = "model name\t: Intel(R) Core(TM) i7-4770\nflags\t\t: fpu avx avx2 fma\n"


def test_amx_xeon_is_read_from_cpuinfo():
    model, flags = isa.parse_cpuinfo(XEON)
    found = isa.from_parts(model, "x86_64", "AVX512", flags)
    assert found.cpu_model == "Intel(R) Xeon(R) Platinum 8480+"
    assert found.amx_bf16 and found.amx_int8 and found.avx512_fp16
    assert (found.int8_gemm, found.bf16_gemm) == ("amx", "amx")
    assert "fpu" not in found.flags  # only the flags that decide kernels are kept


def test_avx512_without_amx():
    found = isa.from_parts(*isa.parse_cpuinfo(EPYC)[:1], "x86_64", "AVX512", isa.parse_cpuinfo(EPYC)[1])
    assert not found.amx_int8 and found.avx512_vnni and found.avx512_bf16
    assert (found.int8_gemm, found.bf16_gemm) == ("avx512-vnni", "avx512-bf16")
    assert not found.arm


def test_arm_sve_neon_and_avx2_only():
    model, flags = isa.parse_cpuinfo(GRAVITON)
    arm = isa.from_parts(model, "aarch64", "SVE256", flags)
    assert arm.cpu_model == "ARM CPU part 0xd4f"
    assert arm.arm and arm.neon and arm.sve and not arm.avx2
    assert (arm.int8_gemm, arm.bf16_gemm) == ("arm-i8mm", "arm-bf16")
    old = isa.from_parts(*isa.parse_cpuinfo(OLD_X86)[:1], "x86_64", "AVX2", isa.parse_cpuinfo(OLD_X86)[1])
    assert old.avx2 and not old.avx512 and (old.int8_gemm, old.bf16_gemm) == ("avx2", "none")


def test_detect_reads_this_machine():
    here = isa.detect()
    assert here.capability == torch.backends.cpu.get_cpu_capability()
    assert here.cpu_model and here.machine
    assert here.flags <= frozenset(isa.RELEVANT_FLAGS)
    assert here.summary().startswith(here.cpu_model)


def test_fingerprint_is_stable_and_tells_machines_apart():
    xeon = isa.from_parts(*isa.parse_cpuinfo(XEON)[:1], "x86_64", "AVX512", isa.parse_cpuinfo(XEON)[1])
    epyc = isa.from_parts(*isa.parse_cpuinfo(EPYC)[:1], "x86_64", "AVX512", isa.parse_cpuinfo(EPYC)[1])
    assert isa.fingerprint(xeon, threads=1) == isa.fingerprint(xeon, threads=1)
    assert isa.fingerprint(xeon, threads=1) != isa.fingerprint(epyc, threads=1)
    assert isa.fingerprint(xeon, threads=1) != isa.fingerprint(xeon, threads=2)
    assert torch.__version__ in isa.fingerprint(xeon, threads=1)
    assert "threads-" in isa.fingerprint()
