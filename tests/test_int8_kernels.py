"""fxopt::int8_linear: agreement with the QDQ graph, the eager lowering, export/dynamo, devices."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from fxopt.passes import QuantizeInt8

import fxopt
import fxopt.kernels.int8 as int8
from fxopt.cost import graph_cost
from fxopt.ir import constants, count_ops, ops
from fxopt.ir.qdq import qops
from fxopt.kernels.int8 import int8_linear_op
from fxopt.quant import quantize_weight
from fxopt.testing import assert_outputs_close, run_pass

qd = torch.ops.quantized_decomposed


def qdq_reference(x, qweight, scale, bias, input_scale=None):
    """The QDQ pattern, op for op, as the quantize-int8 pass writes it."""
    if input_scale is None:
        s, zp = qd.choose_qparams_per_token(x, torch.int8)
        xq = qd.quantize_per_token(x, s, zp, -128, 127, torch.int8)
        xdq = qd.dequantize_per_token(xq, s, zp, -128, 127, torch.int8, x.dtype)
    else:
        xq = qd.quantize_per_tensor(x, input_scale, 0, -128, 127, torch.int8)
        xdq = qd.dequantize_per_tensor(xq, input_scale, 0, -128, 127, torch.int8, out_dtype=x.dtype)
    w = qd.dequantize_per_channel(qweight, scale, None, 0, -127, 127, torch.int8, out_dtype=x.dtype)
    return torch.nn.functional.linear(xdq, w, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_token_quantization_is_bit_exact_with_quantized_decomposed(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(37, 50) * torch.logspace(-3, 3, 37)[:, None]).to(dtype)
    x[3] = 0.0
    xq, scale = int8.quantize_per_token(x)
    s, zp = qd.choose_qparams_per_token(x, torch.int8)
    assert torch.equal(xq, qd.quantize_per_token(x, s, zp, -128, 127, torch.int8))
    assert torch.equal(scale, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_quantized_a_few_rows_at_a_time_are_the_whole_weights_numbers(monkeypatch, dtype) -> None:
    """Chunks of rows (a cache-sized float copy at a time), stacked siblings too: the numbers
    of quantizing each whole weight at once, with zero rows and a chunk ending mid-weight."""
    import fxopt.quant as quant

    monkeypatch.setattr(quant, "QUANTIZE_CHUNK", 3 * 40)  # three rows of 40 columns per chunk
    torch.manual_seed(0)
    weights = [(torch.randn(rows, 40) * torch.logspace(-3, 2, rows)[:, None]).to(dtype) for rows in (8, 5)]
    weights[0][4] = 0.0

    def whole(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

    for weight in weights:
        assert all(map(torch.equal, quantize_weight(weight), whole(weight)))
    stacked = quant.quantize_weights_stacked(weights)
    expected = [whole(w) for w in weights]
    assert torch.equal(stacked[0], torch.cat([q for q, _ in expected]))
    assert torch.equal(stacked[1], torch.cat([s for _, s in expected]))


@pytest.mark.parametrize("shape", [(1, 16), (5, 33), (2, 3, 64), (40, 24)])
@pytest.mark.parametrize("out_features", [7, 48])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("input_scale", [None, 0.03])
def test_int8_linear_matches_the_qdq_graph(shape, out_features, with_bias, input_scale) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    qweight, scale = quantize_weight(torch.randn(out_features, shape[-1]))
    bias = torch.randn(out_features) if with_bias else None
    got = torch.ops.fxopt.int8_linear(x, qweight, scale, bias, input_scale)
    expected = qdq_reference(x, qweight, scale, bias, input_scale)
    assert got.shape == expected.shape == (*shape[:-1], out_features)
    # int32 accumulation is exact; only the float rescale and the float reference round
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def dynamic_tensor_reference(x, qweight, scale, bias):
    """The dynamic per-tensor QDQ pattern, op for op, as the quantize-int8 pass writes it."""
    s, zp = qd.choose_qparams.tensor(x, 0, 255, torch.finfo(torch.float32).eps, torch.uint8)
    xq = qd.quantize_per_tensor.tensor(x, s, zp, 0, 255, torch.uint8)
    xdq = qd.dequantize_per_tensor.tensor(xq, s, zp, 0, 255, torch.uint8, out_dtype=x.dtype)
    w = qd.dequantize_per_channel(qweight, scale, None, 0, -127, 127, torch.int8, out_dtype=x.dtype)
    return torch.nn.functional.linear(xdq, w, bias)


@pytest.mark.parametrize("offset", [0.0, 0.7, -3.0])  # zero point inside, and at either end
def test_dynamic_tensor_qparams_match_choose_qparams(offset: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(9, 40) + offset
    scale, zero_point = int8.dynamic_tensor_qparams(x)
    s, zp = qd.choose_qparams.tensor(x, 0, 255, torch.finfo(torch.float32).eps, torch.uint8)
    assert float(scale) == float(s) and int(zero_point) == int(zp)


def test_dynamic_tensor_qparams_as_numbers_are_the_tensor_ops_bits() -> None:
    """The hot path's float32 scalar arithmetic gives the tensor ops' scale and zero point, bit
    for bit: random ranges and magnitudes, one sign only, constants, signed zeros, NaN."""
    from fxopt.quant import dynamic_tensor_qparams, dynamic_tensor_qparams_values

    generator = torch.Generator().manual_seed(0)
    cases = [torch.randn(64, 97, generator=generator) * 10.0 ** float(torch.randint(-30, 30, (), generator=generator))
             + float(torch.randn((), generator=generator)) * 10.0 ** float(torch.randint(-3, 3, (), generator=generator))
             for _ in range(400)]
    cases += [torch.rand(8, 8, generator=generator) + 5, -torch.rand(8, 8, generator=generator) - 1e-3,
              torch.zeros(4, 4), torch.full((3, 5), -0.0), torch.full((2, 2), 7.25), torch.tensor([[1e-45, -1e-45]]),
              torch.tensor([[3.0, float("nan")]]), torch.randn(6, 10, generator=generator)[:, ::3]]
    for x in cases:
        scale, zero_point = dynamic_tensor_qparams(x)
        got = dynamic_tensor_qparams_values(x)
        assert isinstance(got[1], int)
        want = (float(scale), int(zero_point))
        assert got == want or (got[0] != got[0] and want[0] != want[0]), (x, got, want)


@pytest.mark.parametrize("shape", [(1, 16), (5, 33), (2, 3, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kernel", ["", "onednn", "fbgemm", "int_mm"])  # "": the preferred engine
def test_dynamic_tensor_linear_matches_the_qdq_graph(monkeypatch, shape, with_bias, kernel) -> None:
    if kernel == "int_mm":
        monkeypatch.setattr(int8, "exact_engines", lambda: ())
    elif (kernel or int8.preferred_engine()) not in int8.exact_engines():
        pytest.skip(f"no exact quantized engine {kernel!r} on this CPU")
    torch.manual_seed(0)
    x = torch.randn(shape) + 0.4
    qweight, scale = quantize_weight(torch.randn(48, shape[-1]))
    bias = torch.randn(48) if with_bias else None
    got = torch.ops.fxopt.int8_linear_dynamic_tensor(x, qweight, scale, bias, "" if kernel == "int_mm" else kernel)
    expected = dynamic_tensor_reference(x, qweight, scale, bias)
    assert got.shape == expected.shape == (*shape[:-1], 48)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_each_engine_packs_its_own_weights() -> None:
    """A weight run on two engines is packed once for each (the packs are not shared)."""
    engines = [e for e in ("onednn", "fbgemm") if e in int8.exact_engines()]
    if len(engines) < 2:
        pytest.skip("fewer than two exact quantized engines on this CPU")
    qweight, scale = quantize_weight(torch.randn(16, 32))
    packs = [int8.prepacked(qweight, scale, None, engine) for engine in engines]
    assert packs[0] is not packs[1]
    assert [int8.prepacked(qweight, scale, None, engine) for engine in engines] == packs  # both kept
    int8.forget_packs(qweight, keep=engines[1])  # the engine that lost a measurement lets go of its pack
    assert int8.prepacked(qweight, scale, None, engines[1]) is packs[1]
    assert int8.prepacked(qweight, scale, None, engines[0]) is not packs[0]


def test_a_pack_that_keeps_its_weight_keeps_the_int8_weight_itself() -> None:
    """oneDNN's quantized engine keeps the quantized weight it packs: it is given a view of the
    int8 weight's memory, not a copy, and computes what a pack of a copy computes."""
    if "onednn" not in int8.exact_engines():
        pytest.skip("oneDNN's quantized engine does not run exactly on this CPU")
    torch.manual_seed(0)
    qweight, scale = quantize_weight(torch.randn(48, 64))
    qweight = qweight[8:]  # a view with an offset into its storage
    view = int8.quantized_view(qweight, scale[8:])
    assert view.dtype == torch.qint8 and view.data_ptr() == qweight.data_ptr()
    assert torch.equal(view.int_repr(), qweight)
    torch.testing.assert_close(view.q_per_channel_scales(), scale[8:].double())
    packed = int8.prepacked(qweight, scale[8:], None, "onednn")
    kept, _ = packed.unpack()
    assert kept.data_ptr() == qweight.data_ptr()
    x = torch.randn(5, 64)
    copied = torch._make_per_channel_quantized_tensor(qweight, scale[8:].double(),
                                                      torch.zeros(40, dtype=torch.int64), 0)
    with int8._engine("onednn"):
        expected = torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(copied, None), False)
        got = torch.ops.quantized.linear_dynamic(x, packed, False)
    assert torch.equal(got, expected)


def test_quantized_activations_are_read_as_integers_without_a_copy() -> None:
    """oneDNN's int8 kernel takes uint8 activations: they are the quantized tensor's own
    memory, the integers ``int_repr()`` would copy."""
    from fxopt.lowering.onednn_qlinear import quantize_u8

    torch.manual_seed(0)
    x = torch.randn(6, 40) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor types are deprecated upstream
        quantized = torch.quantize_per_tensor(x, 0.05, 120, torch.quint8)
    integers = int8.integer_view(quantized)
    assert integers.dtype == torch.uint8 and integers.data_ptr() == quantized.data_ptr()
    assert torch.equal(integers, quantized.int_repr())
    expected = torch.clamp(torch.round(x / 0.05) + 120, 0, 255).to(torch.uint8)
    assert torch.equal(quantize_u8(x, 0.05, 120), expected)


def test_quantized_engine_probe_finds_exact_sums_or_says_why() -> None:
    engine = int8.preferred_engine()
    if engine is None:
        pytest.skip("this PyTorch build has no quantized engine")
    reason = int8.quantized_engine_unsupported_reason(engine)
    assert reason is None or engine in reason
    assert (reason is None) == (engine in int8.exact_engines())
    assert "failed on engine 'no-such-engine'" in int8.quantized_engine_unsupported_reason("no-such-engine")


def test_prepacked_weights_are_repacked_when_the_weight_changes() -> None:
    if int8.preferred_engine() not in int8.exact_engines():
        pytest.skip("no exact quantized engine on this CPU")
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    qweight, scale = quantize_weight(torch.randn(16, 32))
    before = torch.ops.fxopt.int8_linear_dynamic_tensor(x, qweight, scale, None)
    qweight.neg_()
    after = torch.ops.fxopt.int8_linear_dynamic_tensor(x, qweight, scale, None)
    torch.testing.assert_close(after, dynamic_tensor_reference(x, qweight, scale, None), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_int_mm_accumulates_in_int32_without_overflow() -> None:
    k = 4096  # x quantizes to 127 everywhere: the sum 127 * 127 * 4096 overflows int16, not int32
    x = torch.full((2, k), 1.0)
    qweight = torch.full((8, k), 127, dtype=torch.int8)
    out = torch.ops.fxopt.int8_linear(x, qweight, torch.ones(8), None, None)
    assert torch.equal(out, torch.full((2, 8), 127.0 * k))  # x scale 1/127 x int sum


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()


def test_eager_backend_lowers_qdq_to_int8_kernels_and_keeps_only_int8_weights() -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(4, 9, 64)
    opt = fxopt.compile(model, (x,), passes=["quantize-int8(activations='dynamic')"], backend="eager")
    gm = opt.graph_module
    assert count_ops(gm, int8_linear_op) == 2
    assert count_ops(gm, ops.linear, qops.dequantize_per_channel, qops.quantize_per_token) == 0
    weights = [t for _, t in constants(gm) if t.dim() == 2]
    assert weights and all(t.dtype == torch.int8 for t in weights)
    assert opt.report.final.weight_bytes < 0.3 * opt.report.original.weight_bytes
    assert any("2 Linear(s) run on int8 kernels" in note for note in opt.report.notes)
    assert graph_cost(gm).flops == opt.report.original.flops  # int8_linear's FLOPs are registered
    qdq = run_pass("quantize-int8(activations='dynamic')", model, (x,))
    # Layer 1 agrees to float rounding; that rounding can move one of layer 2's inputs across
    # a quantization step, so the kernel and QDQ graph differ by far less than either from fp32.
    drift = assert_outputs_close([opt(x)], qdq.outputs(), rtol=5e-3)
    assert drift < qdq.record.max_rel_err / 4


def test_static_activations_lower_too() -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(16, 64)
    calibration = [(torch.randn(16, 64),) for _ in range(2)]
    opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="static")], calibration=calibration)
    assert count_ops(opt.graph_module, int8_linear_op) == 2
    qdq = run_pass(QuantizeInt8(activations="static"), model, (x,), calibration=calibration)
    drift = assert_outputs_close([opt(x)], qdq.outputs(), rtol=5e-3)
    assert drift < qdq.record.max_rel_err / 4


def test_dynamic_tensor_activations_lower_to_their_own_kernel() -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(4, 9, 64)
    quantize = QuantizeInt8(activations="dynamic-tensor")
    opt = fxopt.compile(model, (x,), passes=[quantize], backend="eager")
    gm = opt.graph_module
    assert count_ops(gm, int8.int8_linear_dynamic_tensor_op) == 2
    assert count_ops(gm, int8_linear_op, ops.linear, qops.choose_per_tensor, qops.dequantize_per_channel) == 0
    assert any("2 Linear(s) run on int8 kernels (fxopt::int8_linear_dynamic_tensor)" in n for n in opt.report.notes)
    assert graph_cost(gm).flops == opt.report.original.flops
    qdq = run_pass(quantize, model, (x,))
    drift = assert_outputs_close([opt(x)], qdq.outputs(), rtol=5e-3)
    assert drift < qdq.record.max_rel_err / 4


def test_device_without_int8_support_keeps_the_qdq_graph_with_reason(monkeypatch) -> None:
    torch.manual_seed(0)
    monkeypatch.setattr(int8, "int8_unsupported_reason", lambda device: "no int8 GEMM here")
    model, x = mlp(), torch.randn(4, 64)
    opt = fxopt.compile(model, (x,), passes=["quantize-int8"])
    assert count_ops(opt.graph_module, int8_linear_op) == 0
    assert count_ops(opt.graph_module, qops.dequantize_per_channel) == 2
    assert any("no int8 GEMM here" in note for note in opt.report.notes)
    with torch.no_grad():
        assert float((opt(x) - model(x)).abs().max() / model(x).abs().max()) < 0.05


def test_unknown_device_type_is_reported_unsupported() -> None:
    assert "no int8 GEMM" in int8.int8_unsupported_reason("meta")


class Int8Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        qweight, scale = quantize_weight(torch.randn(24, 32))
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.fxopt.int8_linear(x, self.qweight, self.scale, None, None)
        return y.relu() + torch.ops.fxopt.int8_linear_dynamic_tensor(x, self.qweight, self.scale, None)


def test_int8_op_passes_through_torch_export_and_dynamo() -> None:
    torch.manual_seed(0)
    layer, x = Int8Layer().eval(), torch.randn(2, 5, 32)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(layer, (x,), dynamic_shapes={"x": {0: batch}}, strict=False)
    assert {int8_linear_op, int8.int8_linear_dynamic_tensor_op} <= {n.target for n in exported.graph.nodes}
    other = torch.randn(3, 5, 32)
    torch.testing.assert_close(exported.module()(other), layer(other))
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.cuda
def test_cuda_int8_linear_pads_small_batches_and_matches_cpu() -> None:
    torch.manual_seed(0)
    if int8.int8_unsupported_reason("cuda"):
        pytest.skip(int8.int8_unsupported_reason("cuda"))
    x = torch.randn(3, 64)
    qweight, scale = quantize_weight(torch.randn(32, 64))
    cpu = torch.ops.fxopt.int8_linear(x, qweight, scale, None, None)
    gpu = torch.ops.fxopt.int8_linear(x.cuda(), qweight.cuda(), scale.cuda(), None, None)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_lowering_skips_shapes_cublas_cannot_take() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 36), torch.nn.ReLU(), torch.nn.Linear(36, 32)).eval()
    x = torch.randn(20, 64)
    opt = fxopt.compile(model.cuda(), (x.cuda(),), passes=["quantize-int8"], device="cuda")
    assert count_ops(opt.graph_module, int8_linear_op) == 0  # 36 features: not a multiple of 8
    reason = int8.int8_unsupported_reason("cuda") or "multiples of 8"
    assert any(reason in note for note in opt.report.notes)


def test_chained_linears_lower_to_chained_int8_ops() -> None:
    # found by the random-graph fuzzer: the second Linear's pattern held the first, replaced node
    import fxopt
    from fxopt.ir import count_ops

    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False)).eval()
    x = torch.randn(1, 16)
    opt = fxopt.compile(model, (x,), passes=["quantize-int8(activations='dynamic')"])
    assert count_ops(opt.graph_module, torch.ops.fxopt.int8_linear.default) == 2
    reference = model(x)
    assert (opt(x) - reference).abs().max() <= 0.05 * reference.abs().max()


def test_saved_int8_program_loads_after_import_fxopt(tmp_path) -> None:
    import subprocess
    import sys

    torch.manual_seed(0)
    layer, x = Int8Layer().eval(), torch.randn(2, 5, 32)
    path = tmp_path / "int8.pt2"
    torch.export.save(torch.export.export(layer, (x,), strict=False), str(path))
    torch.save(x, tmp_path / "x.pt")
    script = (f"import torch, fxopt; ep = torch.export.load({str(path)!r}); "
              f"torch.save(ep.module()(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), layer(x))


def test_compiles_of_one_model_share_its_int8_weights() -> None:
    """Two graphs of one model (a causal LM's prefill and decode are two compiles) hold one int8
    copy of each weight, not one each."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    spec = ["quantize-int8(activations='dynamic-tensor', budget=1.0)"]
    first, second = (fxopt.compile(model, (torch.randn(rows, 64),), passes=spec, progress=False, measure=False)
                     for rows in (8, 1))

    def int8_storages(opt: fxopt.OptimizedModule) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in opt.graph_module.buffers() if t.dtype == torch.int8}

    def packed(opt: fxopt.OptimizedModule) -> dict[str, int]:  # oneDNN's copies, the module's only ones
        return {target: id(unpack.__self__.packed) for target, unpack in opt._packed.items()}

    if packed(first) or packed(second):
        assert len(packed(first)) == 2 and packed(first) == packed(second)
        assert all(t.is_meta for t in first._modules["graph_module"].buffers() if t.dtype == torch.int8)
    else:
        assert len(int8_storages(first)) == 2 and int8_storages(first) == int8_storages(second)


def test_engine_packed_linears_hold_the_engines_pack_alone(tmp_path) -> None:
    """A dynamic per-tensor Linear on a quantized engine runs on a pack made once, which is the
    module's only copy of its int8 weight: the graph unpacks the same integers when read, and
    the outputs are those of the op it replaced."""
    from fxopt.kernels import int8
    from fxopt.lowering import lower_graph
    from fxopt.quant import quantize_weight

    if not int8.exact_engines():
        pytest.skip("no quantized engine runs the dynamic int8 Linear exactly here")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    x = torch.randn(8, 64)
    spec = ["quantize-int8(activations='dynamic-tensor', budget=1.0)"]
    opt = fxopt.compile(model, (x,), passes=spec, progress=False, measure=False)
    graph = opt.graph_module
    kernels = lower_graph(graph, "eager", torch.device("cpu"), "kernel").graph_module
    assert count_ops(kernels, int8.int8_linear_dynamic_tensor_op) == 0
    assert len(opt._packed) == 2 and all(opt._modules["graph_module"].get_buffer(t).is_meta for t in opt._packed)
    held = {tuple(graph.get_buffer(t).shape): graph.get_buffer(t) for t in opt._packed}
    for layer in (model[0], model[2]):
        assert torch.equal(held[tuple(layer.weight.shape)], quantize_weight(layer.weight)[0])
    with torch.no_grad():
        torch.testing.assert_close(kernels(x)[0], graph(x)[0], rtol=0, atol=0)
        torch.testing.assert_close(opt(x), graph(x)[0], rtol=0, atol=0)
    fxopt.save(opt, tmp_path / "engine.fxopt")
    with torch.no_grad():
        torch.testing.assert_close(fxopt.load(tmp_path / "engine.fxopt")(x), opt(x), rtol=0, atol=0)


def test_engine_packed_leaves_a_linear_no_engine_runs_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a quantized engine that runs it exactly (no VNNI: int16 pair sums saturate), a
    dynamic int8 Linear keeps fxopt's op, which then runs on torch._int_mm, and its int8
    weight stays a plain tensor of the graph."""
    from fxopt.lowering import engine_packed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    x = torch.randn(8, 64)
    spec = ["quantize-int8(activations='dynamic-tensor', budget=1.0)"]
    graph = fxopt.compile(model, (x,), passes=spec, progress=False, measure=False).graph_module
    lowering = engine_packed.EnginePackedInt8()
    if int8.exact_engines():
        assert lowering.applies(graph)
    monkeypatch.setattr(int8, "exact_engines", lambda: ())
    assert not lowering.applies(graph)
    result = lowering.lower(graph, torch.device("cpu"))
    assert result.lowered == 0 and not result.packed
    assert count_ops(graph, int8.int8_linear_dynamic_tensor_op) == 1


def test_each_packed_weight_leaves_the_lowering_as_soon_as_its_kernel_holds_it(monkeypatch) -> None:
    """The lowering holds an int8 weight once: as each kernel packs its weight, the plain one
    leaves the optimized graph and the lowering's copies of it (not only at the end), so a
    large model's lowering does not hold every weight twice at its top."""
    from fxopt.backends import eager as eager_backend
    from fxopt.lowering.base import PlainCopies

    torch.manual_seed(0)
    widths = [64, 96, 128, 96, 64]
    layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.ReLU())]).eval()
    x = torch.randn(8, 64)
    alive_at_each_pack, plain = [], []
    packed = PlainCopies.packed

    def watched(self, gm, target, unpack):
        weight = gm._buffers.get(target)
        if any(graph._buffers.get(target) is weight for graph in self.graphs):  # not a site measured alone
            alive_at_each_pack.append(sum(ref() is not None for ref in plain))  # the earlier sites' weights
            plain.append(weakref.ref(weight.untyped_storage()))
        packed(self, gm, target, unpack)

    monkeypatch.setattr(PlainCopies, "packed", watched)
    monkeypatch.setattr(eager_backend, "COLLECT_BYTES", 0)  # a large model's, where it matters
    opt = fxopt.compile(model, (x,), passes=["quantize-int8(activations='dynamic-tensor')"])
    assert len(plain) == 4
    # Each earlier weight is gone by the next pack but the one before it (it goes once its
    # kernel has replaced the site, which the next pack's turn finds).
    assert alive_at_each_pack == [0, 1, 1, 1]
    assert all(ref() is None for ref in plain)
    assert any("4 weight(s)" in note and "held only as the kernels pack them" in note for note in opt.report.notes)
    reference = run_pass("quantize-int8(activations='dynamic-tensor')", model, (x,))
    assert_outputs_close([opt(x)], reference.outputs(), rtol=5e-3)
    weights = [t for _, t in constants(opt.graph_module) if t.dim() == 2]  # unpacked when read
    assert len(weights) == 4 and all(t.dtype == torch.int8 and t.device.type == "cpu" for t in weights)


def test_a_released_weight_stays_where_something_else_holds_it_and_comes_back_on_restore() -> None:
    from fxopt.ir import copy_graph_module
    from fxopt.lowering.base import LoweringResult, hold_packed, releasing_packed

    root = torch.nn.Module()
    root.register_buffer("w", torch.randn(4, 8))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.nn.functional.linear, (x, graph.get_attr("w"))))
    gm = torch.fx.GraphModule(root, graph)
    weight, held_elsewhere = gm.w, copy_graph_module(gm)  # a stage kept for another candidate
    lowering_copy = copy_graph_module(gm)
    with releasing_packed([gm]) as plain:
        node = next(n for n in lowering_copy.graph.nodes if n.op == "get_attr")
        with lowering_copy.graph.inserting_before(node):
            pack = hold_packed(lowering_copy, node, weight.t().contiguous(), lambda p: p.t(), LoweringResult(), "t")
        assert not plain.released  # the graph being lowered still reads it
        node.replace_all_uses_with(pack)
        plain.settle()
    assert list(plain.released) == ["w"]
    assert gm.w.device.type == "meta" and lowering_copy.w.device.type == "meta"
    assert held_elsewhere.w is weight  # only the lowering's own references went
    plain.restore()
    assert torch.equal(gm.w, weight) and not plain.released
