"""library.optimizers.get_scheduler: lr values against closed-form schedules written out here."""

from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch

from helpers import parser_args  # tests/helpers.py
from library.optimizers import get_optimizer, get_scheduler

BASE_LRS = (1.0, 0.5)  # two groups: every schedule multiplies both by the same factor


def make_args(**overrides) -> argparse.Namespace:
    """The parser's defaults (tests/helpers.py) for a 20-step run."""
    return parser_args(**{"max_train_steps": 20, **overrides})


def make_optimizer() -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in BASE_LRS]
    return torch.optim.SGD(groups, lr=BASE_LRS[0])


def lr_factors(scheduler, optimizer, optimizer_steps: int, num_processes: int = 1) -> list[float]:
    """The lr factor before each optimizer step, stepping the scheduler ``num_processes`` times per step as
    accelerate does for a prepared scheduler. Checks that both groups get the same factor."""
    factors = []
    for _ in range(optimizer_steps):
        lrs = scheduler.get_last_lr()
        factors.append(lrs[0] / BASE_LRS[0])
        assert lrs[1] / BASE_LRS[1] == pytest.approx(factors[-1], abs=1e-12)
        optimizer.step()
        for _ in range(num_processes):
            scheduler.step()
    return factors


def warmup(t: int, w: int) -> float | None:
    return t / w if t < w else None


def linear(t: int, w: int, total: int) -> float:
    return warmup(t, w) if t < w else max(0.0, (total - t) / (total - w))


def cosine(t: int, w: int, total: int) -> float:
    return warmup(t, w) if t < w else 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))


def cosine_restarts(t: int, w: int, total: int, cycles: int) -> float:
    if t < w:
        return warmup(t, w)
    progress = (t - w) / (total - w)
    return 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))


def polynomial(t: int, w: int, total: int, power: float, lr_init: float = BASE_LRS[0], lr_end: float = 1e-7) -> float:
    if t < w:
        return warmup(t, w)
    if t > total:
        return lr_end / lr_init
    return ((lr_init - lr_end) * (1 - (t - w) / (total - w)) ** power + lr_end) / lr_init


def check(args, expected, num_processes: int = 1, steps: int | None = None) -> None:
    steps = args.max_train_steps if steps is None else steps
    optimizer = make_optimizer()
    scheduler = get_scheduler(args, optimizer, num_processes)
    got = lr_factors(scheduler, optimizer, steps, num_processes)
    assert got == pytest.approx([expected(t) for t in range(steps)], abs=1e-9)


def test_constant():
    check(make_args(), lambda t: 1.0)


@pytest.mark.parametrize("warmup_steps, w", [(4, 4), (0.25, 5), (1.0, 20)])
def test_constant_with_warmup_int_and_fraction(warmup_steps, w):
    check(make_args(lr_scheduler="constant_with_warmup", lr_warmup_steps=warmup_steps), lambda t: min(1.0, t / w))


@pytest.mark.parametrize("warmup_steps, w", [(3, 3), (0.1, 2), (0, 0)])
def test_linear(warmup_steps, w):
    check(make_args(lr_scheduler="linear", lr_warmup_steps=warmup_steps), lambda t: linear(t, w, 20))


@pytest.mark.parametrize("warmup_steps, w", [(5, 5), (0.2, 4)])
def test_cosine(warmup_steps, w):
    check(make_args(lr_scheduler="Cosine", lr_warmup_steps=warmup_steps), lambda t: cosine(t, w, 20))


def test_cosine_with_restarts():
    args = make_args(lr_scheduler="cosine_with_restarts", lr_warmup_steps=2, lr_scheduler_num_cycles=3)
    check(args, lambda t: cosine_restarts(t, 2, 20, 3))


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_polynomial(power):
    args = make_args(lr_scheduler="polynomial", lr_warmup_steps=3, lr_scheduler_power=power)
    check(args, lambda t: polynomial(t, 3, 20, power), steps=22)


def test_cosine_with_min_lr():
    args = make_args(lr_scheduler="cosine_with_min_lr", lr_warmup_steps=4, lr_scheduler_min_lr_ratio=0.1)
    check(args, lambda t: warmup(t, 4) if t < 4 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 4) / 16)))


def test_warmup_stable_decay():
    # 20 steps: 4 linear warmup, 10 stable, 6 cosine decay down to min_lr_ratio.
    args = make_args(
        lr_scheduler="warmup_stable_decay", lr_warmup_steps=4, lr_decay_steps=0.3, lr_scheduler_min_lr_ratio=0.2
    )

    def expected(t: int) -> float:
        if t < 4:
            return 0.2 + 0.8 * t / 4
        if t < 14:
            return 1.0
        if t < 20:
            return 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (t - 14) / 6))
        return 0.2

    check(args, expected, steps=22)


def test_inverse_sqrt():
    args = make_args(lr_scheduler="inverse_sqrt", lr_warmup_steps=4, lr_scheduler_timescale=8)
    check(args, lambda t: warmup(t, 4) if t < 4 else 1 / math.sqrt((t + 8 - 4) / 8))


def test_piecewise_constant_from_scheduler_args():
    args = make_args(lr_scheduler="piecewise_constant", lr_scheduler_args=["step_rules='1:5,0.5:12,0.1'"])
    check(args, lambda t: 1.0 if t < 5 else 0.5 if t < 12 else 0.1)


@pytest.mark.parametrize(
    "name, warmup_steps, expected",
    [
        ("cosine", 4, lambda t: cosine(t, 4, 20)),
        ("linear", 0.25, lambda t: linear(t, 5, 20)),
        ("constant_with_warmup", 6, lambda t: min(1.0, t / 6)),
    ],
)
@pytest.mark.parametrize("num_processes", [2, 3])
def test_num_processes_keeps_the_schedule_in_optimizer_steps(name, warmup_steps, expected, num_processes):
    # accelerate steps a prepared scheduler once per process: the curve over optimizer steps must not change.
    args = make_args(lr_scheduler=name, lr_warmup_steps=warmup_steps)
    check(args, expected, num_processes=num_processes)


@pytest.mark.parametrize("scheduler_type", ["StepLR", "torch.optim.lr_scheduler.StepLR"])
def test_scheduler_type_with_args(scheduler_type):
    args = make_args(lr_scheduler_type=scheduler_type, lr_scheduler_args=["step_size=3", "gamma=0.5"])
    check(args, lambda t: 0.5 ** (t // 3))


def test_schedulefree_gets_a_constant_schedule(caplog, default_args):
    pytest.importorskip("schedulefree")
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in BASE_LRS]
    optimizer_args = default_args(optimizer_type="AdamWScheduleFree", learning_rate=1.0)
    _, _, optimizer = get_optimizer(optimizer_args, groups)
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        scheduler = get_scheduler(make_args(lr_scheduler="cosine", lr_warmup_steps=5), optimizer, 1)
    assert "schedule-free optimizers schedule internally" in caplog.text
    for _ in range(3):
        for group in groups:
            group["params"][0].grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr() == list(BASE_LRS)


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"lr_scheduler": "cosin"}, ValueError, r"--lr_scheduler 'cosin' is not known; expected one of constant, .*"),
        ({"lr_warmup_steps": 10}, ValueError, "constant takes no warmup.*constant_with_warmup"),
        ({"lr_scheduler": "linear", "lr_warmup_steps": -1}, ValueError, "--lr_warmup_steps must be"),
        ({"lr_scheduler": "linear", "lr_warmup_steps": 2.5}, ValueError, "--lr_warmup_steps must be"),
        ({"lr_scheduler": "linear", "lr_warmup_steps": "5"}, ValueError, "--lr_warmup_steps must be"),
        ({"lr_scheduler": "cosine", "max_train_steps": None}, ValueError, "cosine needs --max_train_steps"),
        (
            {"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 15, "lr_decay_steps": 10},
            ValueError,
            r"\(15 \+ 10 scheduler steps\) exceed the 20 training steps",
        ),
        ({"lr_scheduler": "cosine_with_min_lr"}, ValueError, "needs --lr_scheduler_min_lr_ratio"),
        ({"lr_scheduler_type": "NoSuchLR"}, ValueError, "torch.optim.lr_scheduler has no class 'NoSuchLR'"),
        ({"lr_scheduler_type": "StepLR", "lr_warmup_steps": 3}, ValueError, "StepLR takes no warmup"),
        ({"lr_scheduler_type": "StepLR"}, TypeError, "--lr_scheduler_type StepLR: .*--lr_scheduler_args"),
        ({"lr_scheduler": "linear", "lr_scheduler_args": ["warmup"]}, ValueError, "--lr_scheduler_args: 'warmup'"),
        ({"lr_scheduler": "adafactor:1e-3"}, ValueError, "only with --optimizer_type Adafactor, not SGD"),
    ],
)
def test_errors(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        get_scheduler(make_args(**overrides), make_optimizer(), 1)


def test_adafactor_schedule_refuses_warmup(default_args):
    groups = [{"params": [torch.nn.Parameter(torch.ones(4))]}]
    optimizer_args = default_args(optimizer_type="Adafactor", learning_rate=1e-3, lr_scheduler="cosine")
    _, _, optimizer = get_optimizer(optimizer_args, groups)
    assert optimizer_args.lr_scheduler == "adafactor:0.001"
    with pytest.raises(ValueError, match="adafactor:0.001 \\(what Adafactor with relative_step=True uses\\)"):
        get_scheduler(make_args(lr_scheduler=optimizer_args.lr_scheduler, lr_warmup_steps=5), optimizer, 1)


def test_num_processes_must_be_positive():
    with pytest.raises(ValueError, match="num_processes must be >= 1"):
        get_scheduler(make_args(), make_optimizer(), 0)
