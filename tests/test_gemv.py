"""fxopt's fused dequantize + GEMV (fxopt.kernels.gemv): it computes what the portable
weight-only op computes, for int8 per channel and packed int4 groups, on any number of rows
and in features that are no multiple of the vector width; the lowering keeps it where it is
measured fastest (injected timings)."""

from __future__ import annotations

import pytest
import torch

from fxopt.kernels import gemv
from fxopt.kernels.weight_only import PACKED_KERNELS, weight_only_linear, weight_only_linear_packed
from fxopt.lowering.weight_only_linear import choose_kernel
from fxopt.pipeline.timings import KernelTimings, fixed_timer
from fxopt.quant import quantize_weight_groupwise


@pytest.fixture(scope="module")
def built() -> None:
    previous = gemv._state.pop("ok", None)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FXOPT_NATIVE_KERNELS", "1")
        if not gemv.available():
            pytest.skip("no C++ compiler to build fxopt's native kernel on this machine")
    yield
    if previous is not None:
        gemv._state["ok"] = previous


@pytest.mark.parametrize("bits, group, in_features", [(8, None, 100), (8, None, 256), (4, 32, 96), (4, 128, 256)])
@pytest.mark.parametrize("rows", [1, 3, 6, 20])
def test_the_native_kernel_computes_what_the_portable_op_computes(built: None, bits: int, group: int | None,
                                                                  in_features: int, rows: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, in_features)
    q, scale, zero = quantize_weight_groupwise(weight, bits, group)
    kernel = PACKED_KERNELS[f"gemv-int{bits}"]
    packed, qparams = kernel.pack(q, scale, zero, torch.float32)
    x = torch.randn(2, rows, in_features)
    bias = torch.randn(48)
    expected = weight_only_linear(x, q, scale, zero, bias, bits, torch.float32)
    got = weight_only_linear_packed(x, packed, qparams, bias, kernel.name, group or in_features, 48, torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if bits == 4:
        assert packed.dtype == torch.uint8 and packed.numel() == q.numel() // 2  # two values a byte


def test_the_lowering_keeps_the_native_kernel_where_it_measures_fastest(built: None, tmp_path) -> None:
    q, scale, zero = quantize_weight_groupwise(torch.randn(64, 128), 8, None)
    fast = KernelTimings(tmp_path / "a", measure=True, fingerprint="m",
                         timer=fixed_timer({"gemv-int8": 0.1, "int8pack": 1.0, "dequantize": 1.0}))
    assert choose_kernel(torch.device("cpu"), q, scale, zero, 8, torch.float32, 4, fast.choose) == "gemv-int8"
    slow = KernelTimings(tmp_path / "b", measure=True, fingerprint="m",
                         timer=fixed_timer({"gemv-int8": 2.0, "int8pack": 1.0, "dequantize": 1.5}))
    assert choose_kernel(torch.device("cpu"), q, scale, zero, 8, torch.float32, 4, slow.choose) != "gemv-int8"


def test_without_the_native_kernel_it_is_no_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(gemv._state, "ok", False)
    assert not PACKED_KERNELS["gemv-int8"].available() and not PACKED_KERNELS["gemv-int4"].available()


@pytest.mark.parametrize("bits", [8, 4])
def test_where_the_native_kernel_is_chosen_the_lowered_graph_calls_its_op_itself(built: None, tmp_path,
                                                                                bits: int) -> None:
    import fxopt
    from fxopt.pipeline.timings import measuring

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32, bias=False)).eval()
    x = torch.randn(3, 5, 128)
    times = {f"gemv-int{bits}": 0.1, "int8pack": 1.0, "int4pack-cpu": 1.0, "dequantize": 1.0}
    with measuring(KernelTimings(tmp_path, measure=True, fingerprint="m", timer=fixed_timer(times))):
        opt = fxopt.compile(model, (x,), passes=[f"quantize-weights(bits={bits}, activations='float32', "
                                                 "group_size=32, budget=1.0)" if bits == 4 else
                                                 "quantize-weights(activations='float32', budget=1.0)"])
    # the eager backend's runner closes over the lowered graph it calls
    lowered = [c.cell_contents for c in opt._runner.__closure__ or () if isinstance(c.cell_contents, torch.fx.GraphModule)]
    code = "\n".join(m.code for m in lowered)
    assert code.count(f"fxopt_gemv.int{bits}_gemv") == 2 and "weight_only_linear_packed" not in code, code
    with torch.no_grad():
        expected = opt.graph_module(x)[0]
    torch.testing.assert_close(opt(x), expected, rtol=1e-4, atol=1e-4)
