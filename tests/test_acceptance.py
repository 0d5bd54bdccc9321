"""The upper confidence bound of a paired metric drop (fxopt.lossy.acceptance)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import beta, binom

from fxopt.errors import InputError
from fxopt.lossy.acceptance import (
    bootstrap_bound,
    check_confidence,
    examples_needed,
    flip_bound,
    flip_rate_bound,
    unsupported_message,
)


def test_zero_flips_in_128_rows_bound_a_drop_by_2_3_points():
    bound = flip_bound(0, 0, 128, 0.95)
    assert bound.observed == 0.0
    assert bound.upper == pytest.approx(1 - 0.05 ** (1 / 128), rel=1e-9)  # by hand: (1 - p)^128 = 0.05
    assert bound.upper == pytest.approx(0.0231, abs=1e-4)


@pytest.mark.parametrize("flips,examples,confidence", [(0, 10, 0.95), (3, 128, 0.95), (7, 360, 0.9),
                                                       (25, 1000, 0.99), (1, 2, 0.95)])
def test_bound_is_the_clopper_pearson_beta_quantile(flips, examples, confidence):
    expected = beta(flips + 1, examples - flips).ppf(confidence)
    assert flip_rate_bound(flips, examples, confidence) == pytest.approx(expected, rel=1e-9)
    # and it is what Clopper-Pearson means: the rate at which seeing <= flips has probability 1 - confidence
    assert binom.cdf(flips, examples, expected) == pytest.approx(1 - confidence, rel=1e-6)


def test_hand_worked_small_cases():
    # 1 of 2: the bound p solves (1-p)^2 + 2p(1-p) = 1 - p^2 = 0.05 -> p = sqrt(0.95)
    assert flip_rate_bound(1, 2, 0.95) == pytest.approx(math.sqrt(0.95), rel=1e-9)
    # 1 of 3: (1-p)^3 + 3p(1-p)^2 = 0.05
    root = brentq(lambda p: (1 - p) ** 3 + 3 * p * (1 - p) ** 2 - 0.05, 1e-9, 1 - 1e-9)
    assert flip_rate_bound(1, 3, 0.95) == pytest.approx(root, rel=1e-7)
    assert flip_rate_bound(5, 5, 0.95) == 1.0  # every example flipped: nothing bounds it


def test_net_flips_give_the_point_estimate_and_harmful_flips_the_bound():
    bound = flip_bound(4, 1, 360, 0.95)
    assert bound.observed == pytest.approx(3 / 360)
    assert bound.upper == pytest.approx(beta(5, 356).ppf(0.95), rel=1e-9)
    assert bound.upper > bound.observed
    assert (bound.harmful, bound.helpful, bound.method) == (4, 1, "flips")
    # more helpful flips lower the point estimate, never the bound
    assert flip_bound(4, 3, 360, 0.95).upper == bound.upper
    # a higher confidence is a wider bound
    assert flip_bound(4, 1, 360, 0.99).upper > bound.upper > flip_bound(4, 1, 360, 0.8).upper


def test_no_confidence_is_the_point_estimate():
    bound = flip_bound(4, 1, 360, None)
    assert bound.upper == bound.observed == pytest.approx(3 / 360)
    assert bound.method == "point"


@pytest.mark.parametrize("max_drop,confidence,needed", [(0.01, 0.95, 299), (0.02, 0.95, 149), (0.005, 0.9, 460)])
def test_examples_needed(max_drop, confidence, needed):
    # by hand: the smallest n with 1 - (1 - confidence)^(1/n) <= max_drop, i.e. n >= log(1-c)/log(1-d)
    assert needed == math.ceil(math.log(1 - confidence) / math.log(1 - max_drop))
    assert examples_needed(max_drop, confidence) == needed
    assert flip_rate_bound(0, needed, confidence) <= max_drop < flip_rate_bound(0, needed - 1, confidence)


def test_examples_needed_for_no_drop_is_none():
    assert examples_needed(0.0, 0.95) is None
    assert "no number of examples" in unsupported_message(0.0, 1000, 0.95, "accuracy")


def test_unsupported_message_names_the_count():
    message = unsupported_message(0.01, 128, 0.95, "accuracy")
    assert "128 examples" in message and "299" in message and "0.0231" in message
    assert unsupported_message(0.01, 299, 0.95, "accuracy") is None


def test_bootstrap_bound_is_seeded_and_above_the_point_estimate():
    rng = np.random.default_rng(1)
    before = rng.normal(1.0, 0.1, 200)
    after = before - rng.normal(0.01, 0.02, 200)  # a small, noisy paired loss

    def score(indices):
        return float(before[indices].mean()), float(after[indices].mean())

    observed = float(before.mean() - after.mean())
    first = bootstrap_bound(score, 200, observed, 0.95)
    second = bootstrap_bound(score, 200, observed, 0.95)
    assert first.upper == second.upper  # fixed seed
    assert first.method == "bootstrap" and first.upper > observed
    # close to the normal-theory bound of a paired mean
    differences = before - after
    normal = differences.mean() + 1.645 * differences.std(ddof=1) / math.sqrt(200)
    assert first.upper == pytest.approx(normal, abs=0.002)
    assert bootstrap_bound(score, 200, observed, None).upper == observed


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "0.95", True])
def test_bad_confidence_is_refused(value):
    with pytest.raises(InputError, match="confidence"):
        check_confidence(value)


def test_confidence_none_and_valid_values_pass():
    assert check_confidence(None) is None
    assert check_confidence(0.9) == 0.9
