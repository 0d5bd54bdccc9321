"""Measured lowering choices and the never-slower check, through fxopt.compile.

Timings are injected (fixed_timer): the tests assert which kernel is kept, what is cached
and what the report says, never how fast anything runs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir import count_ops, ops
from fxopt.lowering import lower_graph
from fxopt.lowering import onednn_linear as onednn
from fxopt.pipeline.timings import KernelTimings, fixed_timer, measuring

pytestmark = pytest.mark.skipif(onednn.onednn_unsupported_reason() is not None,
                                reason=str(onednn.onednn_unsupported_reason()))
fused = torch.ops.mkldnn._linear_pointwise.default
CPU = torch.device("cpu")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 64)).eval()


def _timings(tmp_path, **times: float) -> KernelTimings:
    table = {"onednn": 1.0, "aten": 1.0, "lowered": 1.0, "captured": 1.0, "int8": 0.5, "int8-fbgemm": 0.75, "qdq": 1.0,
             "onednn-qlinear": 1.0, "int8-linear": 1.0, **times}
    return KernelTimings(tmp_path, measure=True, timer=fixed_timer(table), fingerprint="test-machine")


def test_a_fused_kernel_measured_slower_is_not_used(tmp_path) -> None:
    model, x = _mlp(), torch.randn(8, 64)
    timings = _timings(tmp_path, onednn=2.0, aten=1.0)
    with measuring(timings):
        opt = fxopt.compile(model, (x,), passes=[])
    linears = [k for k in opt.report.kernels if k["op"] == "onednn-linear"]
    assert [k["chosen"] for k in linears] == ["aten"] * 3
    assert linears[0]["times"] == {"onednn": [2.0, 2.0], "aten": [1.0, 1.0]}  # two batch sizes
    assert any("3 Linear(s) stay PyTorch's Linear" in note for note in opt.report.notes)
    assert "onednn-linear [linear] x=(8, 64)/(4, 64) w=(128, 64)" in str(opt.report)
    assert "aten runs (aten 1.000/1.000 ms vs onednn" in str(opt.report)
    lowered = lower_graph(opt.graph_module, "eager", CPU, choose=timings.choose).graph_module
    assert count_ops(lowered, fused) == 0 and count_ops(lowered, ops.linear) == 3
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


def test_a_fused_kernel_measured_faster_is_used_and_a_second_compile_measures_nothing(tmp_path) -> None:
    model, x = _mlp(), torch.randn(8, 64)
    first = _timings(tmp_path, onednn=0.5, aten=1.0)
    with measuring(first):
        opt = fxopt.compile(model, (x,), passes=[])
    assert [k["chosen"] for k in opt.report.kernels if k["op"] == "onednn-linear"] == ["onednn"] * 3
    # two distinct Linear shapes at two batch sizes, and the whole graph once
    assert first.measurements == 3 * 2 + 1
    lowered = lower_graph(opt.graph_module, "eager", CPU, choose=first.choose).graph_module
    assert count_ops(lowered, fused) == 3
    # A new compile (a new process would read the same file): every choice from the cache.
    second = _timings(tmp_path, onednn=9.0, aten=1.0)
    with measuring(second):
        again = fxopt.compile(model, (x,), passes=[])
    assert second.measurements == 0
    assert {k["source"] for k in again.report.kernels} == {"cache"}
    assert [k["chosen"] for k in again.report.kernels if k["op"] == "onednn-linear"] == ["onednn"] * 3


def test_a_kernel_must_win_at_both_batch_sizes(tmp_path) -> None:
    timings = KernelTimings(tmp_path, measure=True, fingerprint="m",
                            timer=fixed_timer({"onednn": [0.5, 2.0], "aten": 1.0, "lowered": 1.0, "captured": 1.0}))
    with measuring(timings):
        opt = fxopt.compile(nn.Sequential(nn.Linear(64, 64)).eval(), (torch.randn(8, 64),), passes=[])
    (linear,) = [k for k in opt.report.kernels if k["op"] == "onednn-linear"]
    assert linear["chosen"] == "aten" and linear["times"]["onednn"] == [0.5, 2.0]


def test_measure_false_uses_the_cache_else_the_cost_model(tmp_path) -> None:
    model, x = _mlp(), torch.randn(8, 64)
    cold = _timings(tmp_path / "empty")
    with measuring(cold):
        opt = fxopt.compile(model, (x,), passes=[], measure=False)
    assert cold.measurements == 0
    assert {k["source"] for k in opt.report.kernels} == {"default"}  # the cost model's order: fused
    assert [k["chosen"] for k in opt.report.kernels] == ["onednn"] * 3 + ["lowered"]
    with measuring(_timings(tmp_path, onednn=2.0, aten=1.0)):
        fxopt.compile(model, (x,), passes=[])
    warm = _timings(tmp_path)
    with measuring(warm):
        opt = fxopt.compile(model, (x,), passes=[], measure=False)
    assert warm.measurements == 0
    assert [k["chosen"] for k in opt.report.kernels if k["op"] == "onednn-linear"] == ["aten"] * 3


def test_the_captured_graph_runs_when_the_lowered_one_measures_slower(tmp_path) -> None:
    model, x = _mlp(), torch.randn(8, 64)
    with measuring(_timings(tmp_path, onednn=0.5, aten=1.0, lowered=1.5, captured=1.0)):
        opt = fxopt.compile(model, (x,), passes=["remove-dropout"])
    assert any(note.startswith("nothing could be made faster") for note in opt.report.notes)
    assert opt.report.kernels[-1]["op"] == "whole-graph" and opt.report.kernels[-1]["chosen"] == "captured"
    assert count_ops(opt.graph_module, ops.linear) == 3
    assert (opt.report.final, opt.report.final_max_rel_err) == (opt.report.original, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        y = torch.randn(3, 64)  # the batch stays dynamic in the captured graph
        torch.testing.assert_close(opt(y), model(y))


def test_the_lowered_graph_is_kept_within_noise(tmp_path) -> None:
    model, x = _mlp(), torch.randn(8, 64)
    with measuring(_timings(tmp_path, lowered=1.01, captured=1.0)):
        opt = fxopt.compile(model, (x,), passes=[])
    assert opt.report.kernels[-1]["chosen"] == "lowered"
    assert not any(note.startswith("nothing could be made faster") for note in opt.report.notes)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize(("onednn_ms", "kept"), [(2.0, "int8-linear"), (0.5, "onednn-qlinear")])
def test_static_int8_kernel_variant_is_measured(tmp_path, onednn_ms: float, kept: str) -> None:
    from fxopt.passes import QuantizeInt8

    from fxopt.kernels.int8 import int8_linear_op
    from fxopt.lowering import onednn_qlinear as qlinear

    if qlinear.qlinear_unsupported_reason() is not None:
        pytest.skip(str(qlinear.qlinear_unsupported_reason()))
    model, x = _Block().eval(), torch.randn(4, 64)
    calibration = [(torch.randn_like(x),) for _ in range(2)]
    timings = _timings(tmp_path, **{"onednn-qlinear": onednn_ms, "int8-linear": 1.0})
    with measuring(timings):
        opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="static")], calibration=calibration)
    choices = [k for k in opt.report.kernels if k["op"] == "onednn-qlinear"]
    assert [k["chosen"] for k in choices] == [kept] * 2
    # a lossy pass applied: its int8 graph is never swapped for the float one
    assert "whole-graph" not in {k["op"] for k in opt.report.kernels}
    lowered = lower_graph(opt.graph_module, "eager", CPU, "kernel", choose=timings.choose).graph_module
    qlinears = count_ops(lowered, torch.ops.onednn.qlinear_pointwise.default)
    assert (qlinears, count_ops(lowered, int8_linear_op)) == ((0, 2) if kept == "int8-linear" else (2, 0))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("activations", ["dynamic", "dynamic-tensor"])
@pytest.mark.parametrize(("onednn_ms", "kept"), [(2.0, "int8-linear"), (0.5, "onednn-qlinear")])
def test_dynamic_int8_kernel_variant_is_measured(tmp_path, onednn_ms: float, kept: str, activations: str) -> None:
    from fxopt.passes import QuantizeInt8

    from fxopt.kernels.int8 import int8_linear_dynamic_tensor_op, int8_linear_op
    from fxopt.lowering import engine_packed
    from fxopt.lowering import onednn_qlinear as qlinear

    if qlinear.qlinear_unsupported_reason() is not None:
        pytest.skip(str(qlinear.qlinear_unsupported_reason()))
    model, x = _Block().eval(), torch.randn(2, 3, 64)
    timings = _timings(tmp_path, **{"onednn-qlinear": onednn_ms, "int8-linear": 1.0})
    with measuring(timings):
        opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations=activations)])
    choices = [k for k in opt.report.kernels if k["op"] == "onednn-qlinear"]
    marker = "per-token" if activations == "dynamic" else "dynamic-tensor"
    assert [k["chosen"] for k in choices] == [kept] * 2 and all(marker in k["site"] for k in choices)
    lowered = lower_graph(opt.graph_module, "eager", CPU, "kernel", choose=timings.choose).graph_module
    onednn = sum(n.target in (qlinear.token_qlinear, qlinear.tensor_qlinear) for n in lowered.graph.nodes)
    # (fxopt's per-tensor kernel on a quantized engine runs on its pack: engine-packed-int8)
    fxopts = count_ops(lowered, int8_linear_op, int8_linear_dynamic_tensor_op) + sum(
        n.target is engine_packed.engine_linear for n in lowered.graph.nodes)
    assert (onednn, fxopts) == ((0, 2) if kept == "int8-linear" else (2, 0))
    # oneDNN's kernel rounds the same activations: the same numbers up to float rounding (per
    # tensor, a value on a rounding boundary may move by one step)
    tolerance = 1e-4 if activations == "dynamic" else 2e-2
    with torch.no_grad():
        torch.testing.assert_close(lowered(x)[0], opt.graph_module(x)[0], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(opt(x), model(x), rtol=0.1, atol=0.1)


@pytest.mark.parametrize(("activations", "kept"), [("dynamic-tensor", "onednn-qlinear"), ("dynamic", "int8-linear")])
def test_within_a_small_margin_onednns_fused_kernel_runs_where_the_engine_would_hold_the_weight_twice(
        tmp_path, activations: str, kept: str) -> None:
    """Per tensor on oneDNN's quantized engine (its pack keeps the weight beside its packed copy),
    oneDNN's fused kernel (one copy) runs where it measured within 5%; per token, fxopt's kernel
    holds the weight once, and the faster runs."""
    from fxopt.passes import QuantizeInt8

    from fxopt.kernels import int8 as kernels
    from fxopt.lowering import onednn_qlinear as qlinear

    if qlinear.qlinear_unsupported_reason() is not None or kernels.preferred_engine() != "onednn":
        pytest.skip("oneDNN's fused int8 kernel or its quantized engine is not available here")
    model, x = _Block().eval(), torch.randn(2, 3, 64)
    timings = _timings(tmp_path, **{"onednn-qlinear": 1.03, "int8-linear": 1.0})
    with measuring(timings):
        opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations=activations)])
    choices = [k for k in opt.report.kernels if k["op"] == "onednn-qlinear"]
    assert [k["chosen"] for k in choices] == [kept] * 2
    assert all(k["times"] == {"onednn-qlinear": [1.03, 1.03], "int8-linear": [1.0, 1.0]} for k in choices)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=0.1, atol=0.1)


def test_past_the_memory_bound_the_kernel_holding_the_weight_once_runs_at_any_speed(tmp_path) -> None:
    """Per tensor, oneDNN's quantized engine (its pack keeps the weight beside its packed copy)
    measured twice as fast as oneDNN's fused kernel: in a model past the compile's memory bound
    the fused kernel (one copy) runs all the same."""
    from fxopt.passes import QuantizeInt8

    from fxopt.kernels import int8 as kernels
    from fxopt.lowering import onednn_qlinear as qlinear

    if qlinear.qlinear_unsupported_reason() is not None or kernels.preferred_engine() != "onednn":
        pytest.skip("oneDNN's fused int8 kernel or its quantized engine is not available here")
    model, x = _Block().eval(), torch.randn(2, 3, 64)
    timings = _timings(tmp_path, **{"onednn-qlinear": 2.0, "int8-linear": 1.0, "int8-fbgemm": 2.0})
    chosen, engines = {}, {}
    for bound in (None, 0):
        with measuring(timings):
            opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="dynamic-tensor")], memory_bound=bound)
        chosen[bound] = {k["chosen"] for k in opt.report.kernels}
        engines[bound] = [n.args[4] for n in opt.graph_module.graph.nodes
                          if n.target == kernels.int8_linear_dynamic_tensor_op and len(n.args) > 4]
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x), rtol=0.1, atol=0.1)
    assert chosen[None] == {"int8", "int8-linear"} and not engines[None]  # the preferred engine's: twice
    if "fbgemm" in kernels.exact_engines():  # FBGEMM's engine holds it once, as oneDNN's fused kernel does
        assert chosen[0] == {"int8-fbgemm"} and engines[0] == ["fbgemm"] * 2
    else:
        assert chosen[0] == {"int8", "onednn-qlinear"}


def test_a_dynamic_int8_linear_runs_on_the_engine_measured_fastest(tmp_path) -> None:
    """Per tensor, each exact quantized engine is a candidate of its own: FBGEMM's measured
    fastest, both Linears run on it (oneDNN's kernel lowering leaves them there)."""
    from fxopt.passes import QuantizeInt8

    from fxopt.kernels import int8 as kernels
    from fxopt.lowering import engine_packed

    if "fbgemm" not in kernels.exact_engines() or kernels.preferred_engine() == "fbgemm":
        pytest.skip("FBGEMM is not a second exact engine on this CPU")
    model, x = _Block().eval(), torch.randn(2, 3, 64)
    timings = _timings(tmp_path, **{"int8-fbgemm": 0.25})
    with measuring(timings):
        opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="dynamic-tensor")])
    choices = [k for k in opt.report.kernels if k["op"] == "int8-linear"]
    assert [k["chosen"] for k in choices] == ["int8-fbgemm"] * 2
    assert all(set(k["times"]) == {"int8", "int8-fbgemm", "qdq"} for k in choices)
    engines = [n.args[4] for n in opt.graph_module.graph.nodes if n.target == kernels.int8_linear_dynamic_tensor_op]
    assert engines == ["fbgemm", "fbgemm"]
    # what runs calls the same kernel on the engine's pack (engine-packed-int8)
    lowered = lower_graph(opt.graph_module, "eager", CPU, "kernel", choose=timings.choose).graph_module
    assert sum(n.target is engine_packed.engine_linear for n in lowered.graph.nodes) == 2
    loaded = fxopt.load(fxopt.save(opt, tmp_path / "fbgemm.fxopt"))  # the engine is saved with the graph
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=0.1, atol=0.1)
        torch.testing.assert_close(loaded(x), opt(x))


def test_within_a_small_margin_the_engine_whose_pack_holds_the_weight_once_runs(tmp_path) -> None:
    """oneDNN's quantized engine keeps the weight beside its pack: where FBGEMM's measured within
    5% of it, FBGEMM's runs (its pack is the weight's one copy); 10% slower, oneDNN's still does."""
    from fxopt.passes import QuantizeInt8

    from fxopt.kernels import int8 as kernels

    if "fbgemm" not in kernels.exact_engines() or kernels.preferred_engine() != "onednn":
        pytest.skip("oneDNN's and FBGEMM's engines are not both exact here")
    model, x = _Block().eval(), torch.randn(2, 3, 64)
    for fbgemm, expected in ((0.52, "int8-fbgemm"), (0.55, "int8")):
        timings = _timings(tmp_path / str(fbgemm), **{"int8-fbgemm": fbgemm})
        with measuring(timings):
            opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="dynamic-tensor")])
        choices = [k for k in opt.report.kernels if k["op"] == "int8-linear"]
        assert [k["chosen"] for k in choices] == [expected] * 2, fbgemm
        engines = [n.args[4] if len(n.args) > 4 else "" for n in opt.graph_module.graph.nodes
                   if n.target == kernels.int8_linear_dynamic_tensor_op]
        assert engines == (["fbgemm"] * 2 if expected == "int8-fbgemm" else [""] * 2)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x), rtol=0.1, atol=0.1)


def test_a_static_batch_is_measured_at_its_one_shape(tmp_path) -> None:
    timings = _timings(tmp_path, onednn=0.5)
    with measuring(timings):
        opt = fxopt.compile(nn.Sequential(nn.Linear(64, 64)).eval(), (torch.randn(8, 64),), passes=[],
                            dynamic_shapes="static")
    (linear,) = [k for k in opt.report.kernels if k["op"] == "onednn-linear"]
    assert linear["times"] == {"onednn": [0.5], "aten": [1.0]} and linear["site"].startswith("x=(8, 64) ")


def test_the_real_timer_measures_then_reads_the_cache(tmp_path) -> None:
    # The default timer on real kernels: what is asserted is that every choice was measured,
    # then cached, never which kernel won.
    model, x = _mlp(), torch.randn(8, 64)
    first = KernelTimings(tmp_path, measure=True)
    with measuring(first):
        opt = fxopt.compile(model, (x,), passes=[])
    assert first.measurements == 3 * 2 + 1 and {k["source"] for k in opt.report.kernels} == {"measured"}
    assert all(t > 0 for k in opt.report.kernels for ts in k["times"].values() for t in ts)
    second = KernelTimings(tmp_path, measure=True)
    with measuring(second):
        again = fxopt.compile(model, (x,), passes=[])
    assert second.measurements == 0 and {k["source"] for k in again.report.kernels} == {"cache"}
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize(("int8_ms", "kept"), [(2.0, "qdq"), (0.5, "int8")])
def test_int8_kernel_against_its_qdq_graph_is_measured(tmp_path, int8_ms: float, kept: str) -> None:
    from fxopt.passes import QuantizeInt8

    from fxopt.kernels.int8 import int8_linear_op, int8_unsupported_reason

    if int8_unsupported_reason("cpu") is not None:
        pytest.skip(str(int8_unsupported_reason("cpu")))
    model, x = _Block().eval(), torch.randn(4, 64)
    timings = _timings(tmp_path, int8=int8_ms, qdq=1.0)
    with measuring(timings):
        opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="dynamic")])
    choices = [k for k in opt.report.kernels if k["op"] == "int8-linear"]
    assert [k["chosen"] for k in choices] == [kept] * 2
    assert count_ops(opt.graph_module, int8_linear_op) == (2 if kept == "int8" else 0)
    if kept == "qdq":
        assert count_ops(opt.graph_module, ops.linear) == 2
        assert sum("int8 kernel measured no faster" in note for note in opt.report.notes) == 2
    # the int8 graph and its QDQ form compute the same numbers (the lossy pass was verified on them)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=0.1, atol=0.1)


class _Siblings(nn.Module):
    """Three Linears reading one input: merge-siblings packs them into one GEMM and a split."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 96), nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x).relu(), self.k(x) * 2, self.v(x)], -1)


@pytest.mark.parametrize(("split_ms", "kept"), [(0.5, "split"), (2.0, "merged")])
def test_packed_siblings_are_split_only_where_one_gemm_per_piece_measures_faster(
        tmp_path, split_ms: float, kept: str) -> None:
    model, x = _Siblings().eval(), torch.randn(8, 64)
    timings = _timings(tmp_path, merged=1.0, split=split_ms)
    with measuring(timings):
        opt = fxopt.compile(model, (x,), passes=["merge-siblings"])
    (choice,) = [k for k in opt.report.kernels if k["op"] == "split-linear"]
    assert choice["chosen"] == kept and choice["times"] == {"merged": [1.0, 1.0], "split": [split_ms] * 2}
    assert "pieces=[96, 64, 32]" in choice["site"]
    # the portable graph keeps the packed Linear; the code that runs holds the choice
    assert count_ops(opt.graph_module, ops.split_with_sizes) == 1 and count_ops(opt.graph_module, ops.linear) == 1
    lowered = lower_graph(opt.graph_module, "eager", CPU, choose=timings.choose).graph_module
    gemms = count_ops(lowered, ops.linear) + count_ops(lowered, fused)
    assert (gemms, count_ops(lowered, ops.split_with_sizes)) == ((3, 0) if kept == "split" else (1, 1))
    if kept == "split":  # the pieces read the packed weight's rows, not copies of them
        packed = dict(opt.graph_module.named_buffers())
        storages = {t.untyped_storage().data_ptr() for t in packed.values() if t.dim() == 2}
        pieces = [t for name, t in lowered.named_buffers() if name.startswith("split_") and t.dim() == 2]
        assert len(pieces) == 3 and {t.untyped_storage().data_ptr() for t in pieces} <= storages
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
