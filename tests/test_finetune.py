"""fxopt.finetune: distillation wins back what low-rank lost, on inputs it did not train on,
without touching the original model or the optimized module, deterministically."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.errors import InputError

FEATURES, HIDDEN, CLASSES = 16, 128, 6


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                                torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))
    x = torch.randn(1024, FEATURES, generator=torch.Generator().manual_seed(1))
    y = (x @ torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(2))).argmax(-1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        for batch in torch.arange(1024).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def _agreement(student, teacher, x) -> float:
    with torch.no_grad():
        return float((student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean())


@pytest.fixture(scope="module")
def compressed():
    teacher = _teacher()
    train = torch.randn(512, FEATURES, generator=torch.Generator().manual_seed(3))
    unseen = torch.randn(512, FEATURES, generator=torch.Generator().manual_seed(4))
    # the 128x128 Linear at rank 2 (its neighbours are too small for min_params): 75% agreement left
    opt = fxopt.compile(teacher, (train[:32],), ["low-rank(budget=10, ratio=0.02, multiple=2, min_params=3000)"])
    assert opt.report["low-rank"].applied >= 1
    return teacher, opt, train, unseen


def test_distillation_recovers_agreement_on_unseen_inputs(compressed):
    teacher, opt, train, unseen = compressed
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    constants = {k: v.clone() for k, v in opt.graph_module.state_dict().items()}
    before = _agreement(opt, teacher, unseen)
    tuned = fxopt.finetune(opt, teacher, list(train.split(64)), epochs=5, lr=1e-2, progress=False)
    after = _agreement(tuned, teacher, unseen)
    assert before < 0.8 and after >= before + 0.05, (before, after)  # on inputs it never trained on
    assert all(torch.equal(weights[k], v) for k, v in teacher.state_dict().items())  # the original untouched
    assert all(torch.equal(constants[k], v) for k, v in opt.graph_module.state_dict().items())  # so is opt
    assert tuned.report.final.params == opt.report.final.params  # the same structure, trained
    note = tuned.report.notes[-1]
    assert note.startswith("finetune:") and "top-1 agreement" in note
    assert not any(p.requires_grad for p in tuned.graph_module.parameters())
    assert 0 < tuned.report.final_max_rel_err < 1 and not tuned.report.timings  # its own error, not the compile's


def test_finetune_is_deterministic_for_a_seed(compressed):
    teacher, opt, train, unseen = compressed
    first = fxopt.finetune(opt, teacher, list(train.split(64)), epochs=2, seed=7, progress=False)
    second = fxopt.finetune(opt, teacher, list(train.split(64)), epochs=2, seed=7, progress=False)
    with torch.no_grad():
        assert torch.equal(first(unseen), second(unseen))


def test_mse_distillation_lowers_the_output_error(compressed):
    teacher, opt, train, unseen = compressed
    tuned = fxopt.finetune(opt, teacher, list(train.split(64)), epochs=4, loss="mse", progress=False)
    with torch.no_grad():
        target = teacher(unseen)
        assert torch.nn.functional.mse_loss(tuned(unseen), target) < torch.nn.functional.mse_loss(opt(unseen), target)


def test_the_cosine_schedule_starts_at_lr_and_then_decays(compressed):
    teacher, opt, train, unseen = compressed

    def trained(schedule: str, batches: int):
        tuned = fxopt.finetune(opt, teacher, list(train.split(64))[:batches], epochs=1, lr=1e-2, schedule=schedule,
                               progress=False)
        with torch.no_grad():
            return tuned(unseen)

    assert torch.equal(trained("cosine", 1), trained("constant", 1))  # its one step is at lr
    assert not torch.equal(trained("cosine", 2), trained("constant", 2))  # the second at lr / 2


@pytest.mark.parametrize(("options", "message"), [
    ({"loss": "l1"}, "loss must be one of"),
    ({"epochs": 0}, "epochs must be"),
    ({"lr": -1.0}, "lr and temperature"),
    ({"schedule": "step"}, "schedule must be one of"),
    ({"data": []}, "data is empty"),
    ({"data": torch.randn(4, FEATURES)}, "iterable of input batches"),
])
def test_bad_input_is_refused(compressed, options, message):
    teacher, opt, train, _ = compressed
    arguments = {"data": [train[:8]], **options}
    with pytest.raises(InputError, match=message):
        fxopt.finetune(opt, teacher, progress=False, **arguments)
    with pytest.raises(InputError, match="OptimizedModule"):
        fxopt.finetune(teacher, teacher, [train[:8]], progress=False)
