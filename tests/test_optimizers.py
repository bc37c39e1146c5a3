"""library.optimizers.get_optimizer: sd-scripts' --optimizer_type / --optimizer_args behaviour.

Each built-in is checked against the class built directly (the reference): same parameters, same gradients,
six steps (RAdam-style optimizers hold still for the first few), identical weights afterwards.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import pytest
import torch

from helpers import parser_args  # tests/helpers.py
from library.optimizers import (
    BUILTIN_OPTIMIZERS,
    get_optimizer,
    get_scheduler,
    is_schedulefree,
    optimizer_metadata_string,
    parse_key_value_args,
    resolve_optimizer_type,
)

LR = 1e-3


def make_args(**overrides) -> argparse.Namespace:
    """The parser's defaults (tests/helpers.py), with the lr raised for visible steps and a 10-step run."""
    return parser_args(**{"learning_rate": LR, "max_train_steps": 10, **overrides})


def two_groups(group_lrs=(LR, 3 * LR)) -> list[dict]:
    """Two parameter groups with their own lrs (text encoder / U-Net) and the ``param_names`` our LoRA network
    adds (ARCHITECTURE.md); the same values on every call."""
    generator = torch.Generator().manual_seed(0)
    down = torch.nn.Parameter(torch.randn(16, 8, generator=generator) * 0.1)
    up = torch.nn.Parameter(torch.randn(8, generator=generator) * 0.1)
    return [
        {"params": [down], "lr": group_lrs[0], "param_names": ["lora_te_x.lora_down.weight"]},
        {"params": [up], "lr": group_lrs[1], "param_names": ["lora_unet_x.lora_up.weight"]},
    ]


def run_steps(optimizer: torch.optim.Optimizer, groups: list[dict], steps: int = 6) -> list[torch.Tensor]:
    """Apply ``steps`` steps with fixed pseudo-random gradients; return the parameters afterwards."""
    params = [p for group in groups for p in group["params"]]
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params]


def _cls(module: str, attr: str) -> type:
    return getattr(importlib.import_module(module), attr)


# name → (module, class, extra constructor kwargs): what sd-scripts builds for each built-in name.
REFERENCE = {
    "AdamW": ("torch.optim", "AdamW", {}),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", {}),
    "PagedAdamW": ("bitsandbytes.optim", "PagedAdamW", {}),
    "PagedAdamW8bit": ("bitsandbytes.optim", "PagedAdamW8bit", {}),
    "PagedAdamW32bit": ("bitsandbytes.optim", "PagedAdamW32bit", {}),
    "Lion": ("lion_pytorch", "Lion", {}),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", {}),
    "PagedLion8bit": ("bitsandbytes.optim", "PagedLion8bit", {}),
    "SGDNesterov": ("torch.optim", "SGD", {"momentum": 0.9, "nesterov": True}),
    "SGDNesterov8bit": ("bitsandbytes.optim", "SGD8bit", {"momentum": 0.9, "nesterov": True}),
    "DAdaptation": ("dadaptation.experimental", "DAdaptAdamPreprint", {}),
    "DAdaptAdamPreprint": ("dadaptation.experimental", "DAdaptAdamPreprint", {}),
    "DAdaptAdaGrad": ("dadaptation", "DAdaptAdaGrad", {}),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", {}),
    "DAdaptAdan": ("dadaptation", "DAdaptAdan", {}),
    "DAdaptAdanIP": ("dadaptation.experimental", "DAdaptAdanIP", {}),
    "DAdaptLion": ("dadaptation", "DAdaptLion", {}),
    "DAdaptSGD": ("dadaptation", "DAdaptSGD", {}),
    "Prodigy": ("prodigyopt", "Prodigy", {}),
    "AdamWScheduleFree": ("schedulefree", "AdamWScheduleFree", {}),
    "RAdamScheduleFree": ("schedulefree", "RAdamScheduleFree", {}),
    "SGDScheduleFree": ("schedulefree", "SGDScheduleFree", {}),
    "ANLO": ("library.hina_anlo", "ANLO", {}),
    "HinaANLO": ("library.hina_anlo", "ANLO", {}),
}


def test_reference_table_covers_every_builtin_but_adafactor():
    assert set(REFERENCE) | {"Adafactor"} == set(BUILTIN_OPTIMIZERS)


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_builtin_matches_directly_built_class(name):
    module, attr, extra = REFERENCE[name]
    pytest.importorskip(module)
    reference_class = _cls(module, attr)

    # D-Adaptation and Prodigy estimate the step size: they expect lr ~ 1 (at 1e-3 their first steps round
    # away) and refuse different lrs per group.
    adaptive = name.startswith("DAdapt") or name == "Prodigy"
    group_lrs = (1.0, 1.0) if adaptive else (LR, 3 * LR)
    groups = two_groups(group_lrs)
    optimizer_name, _, optimizer = get_optimizer(make_args(optimizer_type=name, learning_rate=group_lrs[0]), groups)

    assert type(optimizer) is reference_class
    assert optimizer_name == f"{reference_class.__module__}.{reference_class.__name__}"
    assert [g["lr"] for g in optimizer.param_groups] == list(group_lrs)  # a group's own lr wins
    reference_groups = two_groups(group_lrs)
    reference = reference_class(reference_groups, lr=group_lrs[0], **extra)
    if hasattr(reference, "train"):
        reference.train()  # schedule-free: get_optimizer hands them over in train mode
    initial = [p.detach().clone() for g in groups for p in g["params"]]

    stepped = run_steps(optimizer, groups)
    expected = run_steps(reference, reference_groups)

    for before, after, want in zip(initial, stepped, expected):
        assert torch.isfinite(after).all()
        assert not torch.equal(before, after), f"{name} did not move the weights"
        torch.testing.assert_close(after, want, rtol=0, atol=0)


def test_sgdnesterov_defaults_momentum_and_records_it():
    name, args_str, optimizer = get_optimizer(make_args(optimizer_type="SGDNesterov"), two_groups())
    assert (name, args_str) == ("torch.optim.sgd.SGD", "momentum=0.9")
    assert optimizer.defaults["nesterov"] is True

    _, args_str, optimizer = get_optimizer(
        make_args(optimizer_type="SGDNesterov", optimizer_args=["momentum=0.5"]), two_groups()
    )
    assert args_str == "momentum=0.5" and optimizer.defaults["momentum"] == 0.5

    with pytest.raises(ValueError, match="always uses nesterov=True"):
        get_optimizer(make_args(optimizer_type="SGDNesterov", optimizer_args=["nesterov=False"]), two_groups())


@pytest.mark.parametrize(
    "given, resolved",
    [
        ("", "AdamW"),
        (None, "AdamW"),
        ("adamw", "AdamW"),
        ("ADAMW8BIT", "AdamW8bit"),
        ("prodigy", "Prodigy"),
        ("dadaptation", "DAdaptation"),
        ("adamwschedulefree", "AdamWScheduleFree"),
        ("anlo", "ANLO"),
        ("hinaanlo", "HinaANLO"),
        ("SGD", "SGD"),
        ("pytorch_optimizer.CAME", "pytorch_optimizer.CAME"),
    ],
)
def test_optimizer_type_resolution(given, resolved):
    assert resolve_optimizer_type(make_args(optimizer_type=given)) == resolved


def test_lowercase_builtin_builds_the_same_class():
    name, _, optimizer = get_optimizer(make_args(optimizer_type="adamw"), two_groups())
    assert name == "torch.optim.adamw.AdamW" and type(optimizer) is torch.optim.AdamW


def test_legacy_flags():
    assert resolve_optimizer_type(make_args(use_8bit_adam=True)) == "AdamW8bit"
    assert resolve_optimizer_type(make_args(use_lion_optimizer=True)) == "Lion"
    assert resolve_optimizer_type(make_args(use_8bit_adam=True, optimizer_type="adamw8bit")) == "AdamW8bit"
    with pytest.raises(ValueError, match="--use_8bit_adam and --use_lion_optimizer"):
        resolve_optimizer_type(make_args(use_8bit_adam=True, use_lion_optimizer=True))
    with pytest.raises(ValueError, match="--use_8bit_adam .*--optimizer_type Lion"):
        resolve_optimizer_type(make_args(use_8bit_adam=True, optimizer_type="Lion"))
    with pytest.raises(ValueError, match="--use_lion_optimizer .*--optimizer_type ANLO"):
        resolve_optimizer_type(make_args(use_lion_optimizer=True, optimizer_type="ANLO"))


def test_legacy_flag_builds_lion():
    pytest.importorskip("lion_pytorch")
    name, _, _ = get_optimizer(make_args(use_lion_optimizer=True), two_groups())
    assert name == "lion_pytorch.lion_pytorch.Lion"


def test_bare_name_is_a_torch_optim_class():
    name, _, optimizer = get_optimizer(make_args(optimizer_type="SGD", optimizer_args=["momentum=0.8"]), two_groups())
    assert name == "torch.optim.sgd.SGD"
    assert optimizer.defaults["momentum"] == 0.8 and optimizer.defaults["nesterov"] is False


def test_dotted_paths():
    name, _, optimizer = get_optimizer(make_args(optimizer_type="torch.optim.RAdam"), two_groups())
    assert name == "torch.optim.radam.RAdam" and type(optimizer) is torch.optim.RAdam

    pytest.importorskip("pytorch_optimizer")
    groups = two_groups()
    name, _, optimizer = get_optimizer(make_args(optimizer_type="pytorch_optimizer.CAME"), groups)
    came = _cls("pytorch_optimizer", "CAME")
    assert name == f"{came.__module__}.CAME"
    reference_groups = two_groups()
    torch.testing.assert_close(run_steps(optimizer, groups), run_steps(came(reference_groups, lr=LR), reference_groups))


def test_dotted_path_to_anlo():
    anlo = pytest.importorskip("library.hina_anlo").ANLO
    name, args_str, optimizer = get_optimizer(
        make_args(optimizer_type="library.hina_anlo.ANLO", optimizer_args=["normalize_frequency=2"]), two_groups()
    )
    assert (name, args_str) == ("library.hina_anlo.ANLO", "normalize_frequency=2")
    assert type(optimizer) is anlo


def test_unknown_kwarg_to_anlo_names_it():
    pytest.importorskip("library.hina_anlo")
    with pytest.raises(TypeError, match="no_such_option"):
        get_optimizer(make_args(optimizer_type="ANLO", optimizer_args=["no_such_option=1"]), two_groups())


def test_unknown_kwarg_names_class_and_argument():
    with pytest.raises(TypeError, match=r"torch\.optim\.adamw\.AdamW rejected .*foo=1.*'foo'"):
        get_optimizer(make_args(optimizer_args=["foo=1"]), two_groups())


@pytest.mark.parametrize(
    "optimizer_type, error, pattern",
    [
        ("sgd", ValueError, r"Built-in names \(any case\): AdamW, AdamW8bit.*dotted path"),
        ("NoSuchOptimizer", ValueError, "torch.optim has no class 'NoSuchOptimizer'"),
        ("torch.optim.NoSuch", ValueError, "module 'torch.optim' has no class 'NoSuch'"),
        ("torch.optim.lr_scheduler", ValueError, "has no class 'lr_scheduler'"),
        ("no_such_package_xyz.Opt", ImportError, "'no_such_package_xyz'.*install the package"),
    ],
)
def test_unknown_optimizer_type(optimizer_type, error, pattern):
    with pytest.raises(error, match=pattern):
        get_optimizer(make_args(optimizer_type=optimizer_type), two_groups())


def test_optimizer_args_are_python_literals_like_sd_scripts():
    parsed = parse_key_value_args(
        ["betas=0.9,0.999", "weight_decay=1e-2", "amsgrad=True", "mode='global'", "eps = 1e-8", "extra=None"],
        "--optimizer_args",
    )
    assert parsed == {
        "betas": (0.9, 0.999),
        "weight_decay": 0.01,
        "amsgrad": True,
        "mode": "global",
        "eps": 1e-8,
        "extra": None,
    }
    assert parse_key_value_args(None, "--optimizer_args") == {}
    assert parse_key_value_args([], "--optimizer_args") == {}


def test_optimizer_args_reach_the_optimizer_and_the_args_string():
    name, args_str, optimizer = get_optimizer(
        make_args(optimizer_args=["betas=0.8,0.99", "weight_decay=0.05", "amsgrad=True"]), two_groups()
    )
    assert (optimizer.defaults["betas"], optimizer.defaults["weight_decay"], optimizer.defaults["amsgrad"]) == (
        (0.8, 0.99),
        0.05,
        True,
    )
    assert args_str == "betas=(0.8, 0.99),weight_decay=0.05,amsgrad=True"
    assert optimizer_metadata_string(name, args_str) == (
        "torch.optim.adamw.AdamW(betas=(0.8, 0.99),weight_decay=0.05,amsgrad=True)"
    )
    assert optimizer_metadata_string(name, "") == "torch.optim.adamw.AdamW"


@pytest.mark.parametrize(
    "values, error, pattern",
    [
        (["mode=global"], ValueError, r"value of 'mode' in 'mode=global' is not a Python literal.*quote strings"),
        (["betas=(0.9,"], ValueError, r"value of 'betas'.*use_cautious_update=True"),
        (["use_cautious_update"], ValueError, r"'use_cautious_update' is not key=value.*betas=0.9,0.999"),
        (["=1"], ValueError, "no valid argument name"),
        ("weight_decay=0.1", TypeError, "must be a list of key=value strings"),
    ],
)
def test_bad_optimizer_args(values, error, pattern):
    with pytest.raises(error, match=pattern):
        get_optimizer(make_args(optimizer_args=values), two_groups())


def test_lr_belongs_to_learning_rate_not_optimizer_args():
    with pytest.raises(ValueError, match="use --learning_rate"):
        get_optimizer(make_args(optimizer_args=["lr=0.1"]), two_groups())


def test_plain_tensors_and_empty_parameters():
    weight = torch.nn.Parameter(torch.ones(3))
    _, _, optimizer = get_optimizer(make_args(), iter([weight]))
    assert optimizer.param_groups[0]["lr"] == LR and optimizer.param_groups[0]["params"] == [weight]
    with pytest.raises(ValueError, match="no trainable parameters"):
        get_optimizer(make_args(), [])


def test_dadaptation_and_prodigy_warn_about_low_and_multiple_lrs(caplog):
    pytest.importorskip("prodigyopt")
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        get_optimizer(make_args(optimizer_type="Prodigy"), two_groups())
    assert "lr=1.0 is recommended" in caplog.text
    assert "only the first one, 0.001, takes effect" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        get_optimizer(make_args(optimizer_type="prodigy", learning_rate=1.0), two_groups((1.0, 1.0)))
    assert caplog.text == ""


def test_adafactor_relative_step_drops_lrs_and_uses_adafactor_schedule(caplog):
    adafactor = _cls("transformers.optimization", "Adafactor")
    args = make_args(optimizer_type="Adafactor", unet_lr=1e-4, text_encoder_lr=[5e-5])
    groups = two_groups()
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        name, args_str, optimizer = get_optimizer(args, groups)

    assert (name, args_str) == ("transformers.optimization.Adafactor", "relative_step=True")
    assert type(optimizer) is adafactor
    assert [g["lr"] for g in optimizer.param_groups] == [None, None]
    assert (args.learning_rate, args.unet_lr, args.text_encoder_lr) == (None, None, None)
    assert args.lr_scheduler == f"adafactor:{LR}"
    assert "--unet_lr and --text_encoder_lr are ignored" in caplog.text

    scheduler = get_scheduler(args, optimizer, 1)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert scheduler.get_last_lr() == pytest.approx([LR, LR])
    params = [p for g in groups for p in g["params"]]
    rms = [p.detach().pow(2).mean().sqrt().item() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()  # AdafactorSchedule reports the lr Adafactor used, read from groups that have gradients
    # Adafactor's relative step at step 1: min(1e-2, 1/sqrt(1)) * max(eps2 = 1e-3, RMS(p)).
    assert [float(lr) for lr in scheduler.get_last_lr()] == pytest.approx([1e-2 * max(1e-3, r) for r in rms], rel=1e-4)


def test_adafactor_without_relative_step_keeps_lr_and_warns(caplog):
    args = make_args(optimizer_type="adafactor", optimizer_args=["relative_step=False", "scale_parameter=False"])
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        _, args_str, optimizer = get_optimizer(args, two_groups())
    assert args_str == "relative_step=False,scale_parameter=False"
    assert [g["lr"] for g in optimizer.param_groups] == [LR, 3 * LR]
    assert (args.learning_rate, args.lr_scheduler) == (LR, "constant")
    assert "--max_grad_norm is set" in caplog.text and "constant_with_warmup" in caplog.text


def test_adafactor_warmup_init_forces_relative_step():
    args = make_args(optimizer_type="Adafactor", optimizer_args=["relative_step=False", "warmup_init=True"])
    _, args_str, _ = get_optimizer(args, two_groups())
    assert args_str == "relative_step=True,warmup_init=True"
    assert args.lr_scheduler.startswith("adafactor")


def test_schedulefree_is_in_train_mode_and_detected_through_accelerate():
    pytest.importorskip("schedulefree")
    from accelerate.optimizer import AcceleratedOptimizer

    _, _, optimizer = get_optimizer(make_args(optimizer_type="AdamWScheduleFree"), two_groups())
    assert all(g["train_mode"] for g in optimizer.param_groups)
    assert is_schedulefree(optimizer)
    assert not is_schedulefree(torch.optim.AdamW(two_groups()))

    # accelerate's wrapper has train()/eval() for every optimizer; the question is about the wrapped one.
    wrapped = AcceleratedOptimizer.__new__(AcceleratedOptimizer)
    wrapped.optimizer = optimizer
    assert is_schedulefree(wrapped)
    wrapped.optimizer = torch.optim.AdamW(two_groups())
    assert callable(wrapped.train) and not is_schedulefree(wrapped)


@pytest.mark.parametrize(
    "optimizer_type, module, pip_package",
    [
        ("Lion", "lion_pytorch", "lion-pytorch"),
        ("AdamW8bit", "bitsandbytes.optim", "bitsandbytes"),
        ("PagedAdamW", "bitsandbytes.optim", "bitsandbytes"),
        ("Prodigy", "prodigyopt", "prodigyopt"),
        ("DAdaptAdam", "dadaptation", "dadaptation"),
        ("DAdaptation", "dadaptation.experimental", "dadaptation"),
        ("SGDScheduleFree", "schedulefree", "schedulefree"),
        ("Adafactor", "transformers.optimization", "transformers"),
    ],
)
def test_missing_optional_package_names_pip_package(monkeypatch, optimizer_type, module, pip_package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=f"--optimizer_type {optimizer_type} needs .*pip install {pip_package}$"):
        get_optimizer(make_args(optimizer_type=optimizer_type), two_groups())


def test_missing_anlo_module_says_it_belongs_to_the_project(monkeypatch):
    monkeypatch.setitem(sys.modules, "library.hina_anlo", None)
    with pytest.raises(ImportError, match="library.hina_anlo is part of this project"):
        get_optimizer(make_args(optimizer_type="ANLO"), two_groups())


def test_too_old_package_asks_for_upgrade(monkeypatch):
    bnb_optim = pytest.importorskip("bitsandbytes.optim")
    monkeypatch.delattr(bnb_optim, "PagedLion8bit")
    with pytest.raises(ImportError, match="pip install -U bitsandbytes"):
        get_optimizer(make_args(optimizer_type="PagedLion8bit"), two_groups())


def test_optional_packages_are_imported_only_when_chosen(monkeypatch):
    for module in ("lion_pytorch", "bitsandbytes", "prodigyopt", "dadaptation", "schedulefree"):
        monkeypatch.setitem(sys.modules, module, None)
    name, _, _ = get_optimizer(make_args(optimizer_type="AdamW"), two_groups())
    assert name == "torch.optim.adamw.AdamW"
