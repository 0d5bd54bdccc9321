"""Random differential tests: merge-siblings and merge-consecutive on random Linear layouts."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxopt.ir import ops
from fxopt.testing import assert_skipped, run_pass

widths = st.integers(min_value=1, max_value=24)
leading = st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3)


class Siblings(nn.Module):
    def __init__(self, d: int, outs: list[int], biases: list[bool]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, o, bias=b) for o, b in zip(outs, biases))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(head(x) for head in self.heads)


@settings(max_examples=8, deadline=None)
@given(d=widths, outs=st.lists(widths, min_size=2, max_size=4), biases=st.lists(st.booleans(), min_size=4, max_size=4),
       lead=leading, seed=st.integers(0, 2**16))
def test_merge_siblings_matches_on_random_heads(d: int, outs: list[int], biases: list[bool], lead: list[int],
                                                seed: int) -> None:
    torch.manual_seed(seed)
    model = Siblings(d, outs, biases[: len(outs)]).eval()
    run = run_pass("merge-siblings", model, (torch.randn(*lead, d),))
    if run.modified:
        assert run.count(ops.linear) == 1
    else:  # tiny inputs: the zero biases a merge adds can outweigh reading the input once
        assert_skipped(run, "zero biases it adds outweigh", code="not-cheaper")
    run.assert_outputs_match()


@settings(max_examples=8, deadline=None)
@given(dims=st.lists(widths, min_size=3, max_size=5), biases=st.lists(st.booleans(), min_size=4, max_size=4),
       lead=leading, seed=st.integers(0, 2**16))
def test_merge_consecutive_matches_on_random_chains(dims: list[int], biases: list[bool], lead: list[int],
                                                    seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(a, b, bias=f) for a, b, f in zip(dims, dims[1:], biases))).eval()
    run = run_pass("merge-consecutive", model, (torch.randn(*lead, dims[0]),))
    assert run.count(ops.linear) <= len(dims) - 1
    assert run.record.after.flops <= run.record.before.flops
    run.assert_outputs_match()
