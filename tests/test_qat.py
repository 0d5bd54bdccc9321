"""Quantization-aware training in fxopt.finetune: static int8 activations of a model with
outlier channels lose precision; QAT wins it back on inputs it did not train on, the result
is int8 again (the kernel op in the lowered graph), deterministic, and nothing given is changed."""

from __future__ import annotations

import pytest
import torch
from test_finetune import _teacher

import fxopt
from fxopt.errors import InputError
from fxopt.kernels.int8 import INT8_LINEAR_OPS
from fxopt.kernels.weight_only import weight_only_linear_op

OUTLIERS, FACTOR = 4, 40.0


def _with_outliers() -> torch.nn.Module:
    """The trained MLP with 4 hidden units of its first layer 40x larger and the next layer's
    reading of them 40x smaller: the same function, but per-tensor activations 40x wider."""
    model = _teacher()
    with torch.no_grad():
        model[0].weight[:OUTLIERS] *= FACTOR
        model[0].bias[:OUTLIERS] *= FACTOR
        model[2].weight[:, :OUTLIERS] /= FACTOR
    return model


@pytest.fixture(scope="module")
def quantized():
    model = _with_outliers()
    train = torch.randn(1024, 16, generator=torch.Generator().manual_seed(3))
    unseen = torch.randn(1024, 16, generator=torch.Generator().manual_seed(4))
    opt = fxopt.compile(model, (train[:64],), ["quantize-int8(activations='static', budget=10, force=True)"],
                        calibration=list(train[:512].split(64)))
    assert opt.report["quantize-int8"].applied == 3
    return model, opt, list(train.split(64)), unseen


def _mse(student, teacher, x) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(student(x), teacher(x)))


def _int8_ops(opt) -> list:
    return [n.target for n in opt.graph_module.graph.nodes if n.target in INT8_LINEAR_OPS]


def test_qat_lowers_the_int8_error_on_unseen_inputs(quantized):
    model, opt, train, unseen = quantized
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    constants = {k: v.clone() for k, v in opt.graph_module.state_dict().items()}
    tuned = fxopt.finetune(opt, model, train, epochs=3, lr=1e-4, loss="mse", progress=False)
    before, after = _mse(opt, model, unseen), _mse(tuned, model, unseen)
    assert after < 0.6 * before, (before, after)
    assert len(_int8_ops(tuned)) == len(_int8_ops(opt)) == 3  # int8 kernels again, not float Linears
    assert all(t.dtype == torch.int8 for n, t in tuned.graph_module.named_buffers() if "int8" in n and "scale" not in n)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # the original untouched
    assert all(torch.equal(constants[k], v) for k, v in opt.graph_module.state_dict().items())  # so is opt
    note = next(n for n in tuned.report.notes if n.startswith("finetune:"))
    assert "3 quantized Linear(s) by quantization-aware training" in note and "scales learned" in note
    assert not any(p.requires_grad for p in tuned.graph_module.parameters())


def test_qat_is_deterministic_for_a_seed(quantized):
    model, opt, train, unseen = quantized
    first = fxopt.finetune(opt, model, train[:4], epochs=1, lr=1e-4, seed=3, progress=False)
    second = fxopt.finetune(opt, model, train[:4], epochs=1, lr=1e-4, seed=3, progress=False)
    with torch.no_grad():
        assert torch.equal(first(unseen), second(unseen))


def test_refit_scales_observe_the_trained_graph(quantized):
    model, opt, train, unseen = quantized
    tuned = fxopt.finetune(opt, model, train[:4], epochs=1, lr=1e-4, activation_scales="refit", progress=False)
    assert len(_int8_ops(tuned)) == 3
    assert "scales refit" in next(n for n in tuned.report.notes if n.startswith("finetune:"))
    with pytest.raises(InputError, match="activation_scales must be one of"):
        fxopt.finetune(opt, model, train[:4], activation_scales="fixed", progress=False)


def test_weight_only_int4_qat():
    model = _teacher()
    train = torch.randn(1024, 16, generator=torch.Generator().manual_seed(3))
    unseen = torch.randn(1024, 16, generator=torch.Generator().manual_seed(4))
    opt = fxopt.compile(model, (train[:64],), ["quantize-weights(bits=4, group_size=32, activations='float32', "
                                               "budget=10)"])
    assert opt.report["quantize-weights"].applied >= 1
    tuned = fxopt.finetune(opt, model, list(train.split(64)), epochs=3, lr=1e-4, loss="mse", progress=False)
    assert _mse(tuned, model, unseen) < _mse(opt, model, unseen)
    count = sum(n.target == weight_only_linear_op for n in opt.graph_module.graph.nodes)
    assert count >= 1 and sum(n.target == weight_only_linear_op for n in tuned.graph_module.graph.nodes) == count
    assert "weight-only int4" in next(n for n in tuned.report.notes if n.startswith("finetune:"))


@pytest.mark.parametrize("spec", ["quantize-int8(budget=10, force=True)",
                                  "quantize-int8(activations='dynamic-tensor', budget=10, force=True)",
                                  "quantize-int8(activations='static', symmetric=False, budget=10, force=True)"])
def test_fake_quantization_computes_what_the_int8_kernels_compute(spec):
    from fxopt import qat
    from fxopt.ir import copy_graph_module

    model = _with_outliers()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(5))
    opt = fxopt.compile(model, (x[:64],), [spec], calibration=list(x.split(64)))
    student = copy_graph_module(opt.graph_module)
    modules = qat.prepare(student)
    assert len(modules) == 3 and not _int8_ops(type("Opt", (), {"graph_module": student}))
    with torch.no_grad():
        expected, fake, exact = opt(x), student(x)[0], model(x)
        # rounding ties and float order aside, the training copy is the int8 model
        assert (fake - expected).abs().max() <= 0.1 * (expected - exact).abs().max()
        qat.convert(student, modules)  # untrained: quantized again to the same int8 weights
        assert len(_int8_ops(type("Opt", (), {"graph_module": student}))) == 0  # QDQ form, for the backend to lower
        assert (student(x)[0] - expected).abs().max() <= 0.1 * (expected - exact).abs().max()
    int8 = lambda gm: {tuple(t.shape): t for t in gm.buffers() if t.dtype == torch.int8 and t.dim() == 2}  # noqa: E731
    before, after = int8(opt.graph_module), int8(student)  # the old weights are gone, the new ones are the same
    assert len(after) == len(list(student.buffers())) - 3 - 3 == 3  # int8 weights, their scales, the biases
    assert all(torch.equal(after[shape], before[shape]) for shape in before)


def test_labels_join_the_distillation_loss(quantized):
    model, opt, train, unseen = quantized
    task = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))  # test_finetune's task: the model's labels
    labels = [(x @ task).argmax(-1) for x in train[:4]]
    plain = fxopt.finetune(opt, model, train[:4], epochs=1, lr=1e-4, progress=False)
    labelled = fxopt.finetune(opt, model, train[:4], epochs=1, lr=1e-4, labels=labels, label_weight=0.5,
                              progress=False)
    with torch.no_grad():
        assert not torch.equal(plain(unseen), labelled(unseen))  # the same seed and data: the labels changed it
    assert "and labels (weight 0.5)" in next(n for n in labelled.report.notes if n.startswith("finetune:"))
    for bad, message in (([labels[0]], "one tensor of class indices per batch"),
                         ([y.float() for y in labels], "one tensor of class indices per batch")):
        with pytest.raises(InputError, match=message):
            fxopt.finetune(opt, model, train[:4], labels=bad, progress=False)
    with pytest.raises(InputError, match="label_weight must be"):
        fxopt.finetune(opt, model, train[:4], labels=labels, label_weight=2.0, progress=False)
