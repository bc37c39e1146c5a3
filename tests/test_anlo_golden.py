"""ANLO reproduces, bit for bit, the parameters recorded in tests/data/anlo_golden.pt (see tests/anlo_golden.py).

Every option is covered: layer / global / alternating steps, names present and missing, LoRA+ groups, coupled and
decoupled decay, the cautious gate, adaptive eps, SinkGD, orthogonalize, bfloat16 with stochastic rounding, float16,
float64, mixed dtypes, a skipped non-finite step, a missing gradient, the per-tensor write path, and a state dict
saved half way by the implementation that wrote the fixture.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests import anlo_golden

FIXTURE = torch.load(anlo_golden.FIXTURE)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the fixture was written with one intra-op thread


def _expected(name: str) -> dict:
    return FIXTURE[name]


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    diff = (actual - expected).abs()
    assert torch.equal(actual, expected), f"max |difference| {diff.max().item():.3g} at {int(diff.argmax())}"


def test_fixture_covers_every_case():
    assert set(anlo_golden.CASES) <= set(FIXTURE)


@pytest.mark.parametrize("name", sorted(anlo_golden.CASES))
def test_parameters_match_the_recorded_ones_bit_for_bit(name):
    case = anlo_golden.CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped-step warning of nonfinite_* cases
        result = anlo_golden.record(case)
    expected = _expected(name)
    _assert_same(result["params"], expected["params"])
    assert result["skipped_steps"] == expected["skipped_steps"]
    assert result["fired_per_group"] == expected["fired_per_group"]


@pytest.mark.parametrize("name", [n for n, c in anlo_golden.CASES.items() if c.get("resume")])
def test_a_state_dict_saved_by_the_recorded_implementation_continues_identically(name):
    case = anlo_golden.CASES[name]
    expected = _expected(name)
    params = anlo_golden.initial_params(case)
    offset = 0
    for p in params:  # the parameters as the recorded run left them at the save
        p.data.copy_(expected["resume_params"][offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    optimizer = anlo_golden.build(case, params)
    optimizer.load_state_dict(expected["resume_state"])
    assert optimizer.get_normalization_stats()["step_count"] == anlo_golden.RESUME_AT
    anlo_golden.run(case, range(anlo_golden.RESUME_AT, anlo_golden.STEPS), params, optimizer)
    _assert_same(anlo_golden.flat(params), expected["params"])


def test_a_different_run_does_not_match():
    """The comparison can fail: one more step moves the parameters."""
    case = anlo_golden.CASES["default"]
    params = anlo_golden.initial_params(case)
    optimizer = anlo_golden.build(case, params)
    anlo_golden.run(case, range(anlo_golden.STEPS + 1), params, optimizer)
    assert not torch.equal(anlo_golden.flat(params), _expected("default")["params"])
