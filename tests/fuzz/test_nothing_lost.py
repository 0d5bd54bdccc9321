"""Nothing lost: after any pipeline (any registered passes, any order, lossy ones and
rollbacks included), the user's model is bit-identical to before: parameters, buffers,
module tree and train/eval flags."""

from __future__ import annotations

import warnings

from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import ModelSpec, Snapshot, build, model_specs
from test_fuzz import CAMPAIGN, FUZZ

import fxopt

PASS_NAMES = [t.name for t in fxopt.list_passes()]


@settings(FUZZ, max_examples=CAMPAIGN or 60)
@given(model_specs(), st.lists(st.sampled_from(PASS_NAMES), max_size=5), st.booleans(), st.sampled_from(["eager"]))
def test_any_pipeline_leaves_the_model_bit_identical(spec: ModelSpec, passes: list[str], training: bool,
                                                     backend: str) -> None:
    model, inputs = build(spec)
    model.train(training)
    if training and len(model.layers):
        model.layers[0].eval()  # a mix of flags must survive too
    snapshot = Snapshot.of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training-mode notes and rollbacks are reported, not failures here
        opt = fxopt.compile(model, inputs, passes=passes, backend=backend)
        opt(*inputs)
    snapshot.assert_same(model)
    assert [r.name for r in opt.report.passes] == passes
