"""``--optimizer_type`` / ``--optimizer_args`` → optimizer, ``--lr_scheduler`` → learning-rate scheduler.

The behaviour is sd-scripts' (``get_optimizer`` / ``get_scheduler_fix`` in its ``library/train_util.py``), so
existing command lines and TOML configs keep working:

* ``get_optimizer(args, trainable_params) -> (name, args_str, optimizer)``. Built-in names (see
  ``BUILTIN_OPTIMIZERS``) match case-insensitively; empty means AdamW; ``--use_8bit_adam`` / ``--use_lion_optimizer``
  are the legacy spellings of AdamW8bit / Lion. Any other name is a class: without a dot from ``torch.optim``,
  with a dot ``package.module.Class`` (both case-sensitive). The class is built as
  ``cls(groups, lr=args.learning_rate, **optimizer_args)``; a group's own ``lr`` wins. Optional packages are
  imported only when their optimizer is chosen.
* ``get_scheduler(args, optimizer, num_processes) -> scheduler``: the schedules of ``transformers``
  (plus diffusers' ``piecewise_constant`` and the ``adafactor`` schedule), or any class named by
  ``--lr_scheduler_type``.
* ``is_schedulefree(optimizer)``: schedule-free optimizers (``AdamWScheduleFree`` ...) keep two sets of weights;
  the trainer must call ``optimizer.train()`` before training steps and ``optimizer.eval()`` before sampling,
  validating or saving, then ``optimizer.train()`` again. ``get_optimizer`` returns them in train mode.

Attributes of ``args`` read (sd-scripts flag names; the value used when an attribute is absent in brackets):
``optimizer_type`` [None], ``optimizer_args`` [None], ``learning_rate`` [required], ``use_8bit_adam`` [False],
``use_lion_optimizer`` [False], ``max_grad_norm`` [1.0], ``lr_scheduler`` ["constant"], ``lr_warmup_steps`` [0],
``lr_decay_steps`` [0], ``lr_scheduler_num_cycles`` [1], ``lr_scheduler_power`` [1.0],
``lr_scheduler_timescale`` [None], ``lr_scheduler_min_lr_ratio`` [None], ``lr_scheduler_type`` [""],
``lr_scheduler_args`` [None], ``max_train_steps`` [required by schedules that decay].

Side effects, as in sd-scripts: Adafactor with ``relative_step=True`` (its default) computes its own step
size, so ``get_optimizer`` removes the ``lr`` of every group, sets ``args.learning_rate`` (and, when groups had
lrs, ``args.unet_lr`` / ``args.text_encoder_lr``) to None and sets ``args.lr_scheduler`` to
``"adafactor:<learning_rate>"``, which ``get_scheduler`` turns into transformers' ``AdafactorSchedule``.

One deliberate difference: sd-scripts multiplies only the total step count by ``num_processes`` (accelerate
steps a prepared scheduler once per process), so with N GPUs an integer ``--lr_warmup_steps`` ends after 1/N of
the intended optimizer steps. Here integer warmup/decay steps are multiplied too; fractions are taken of the
multiplied total. With one process both agree.
"""

from __future__ import annotations

import ast
import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinOptimizer:
    """Where a built-in ``--optimizer_type`` lives and which pip package provides it."""

    module: str
    attr: str
    pip_package: str | None  # None: a module of this project


BUILTIN_OPTIMIZERS: dict[str, BuiltinOptimizer] = {
    "AdamW": BuiltinOptimizer("torch.optim", "AdamW", "torch"),
    "AdamW8bit": BuiltinOptimizer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "PagedAdamW": BuiltinOptimizer("bitsandbytes.optim", "PagedAdamW", "bitsandbytes"),
    "PagedAdamW8bit": BuiltinOptimizer("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
    "PagedAdamW32bit": BuiltinOptimizer("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes"),
    "Lion": BuiltinOptimizer("lion_pytorch", "Lion", "lion-pytorch"),
    "Lion8bit": BuiltinOptimizer("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "PagedLion8bit": BuiltinOptimizer("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"),
    "SGDNesterov": BuiltinOptimizer("torch.optim", "SGD", "torch"),
    "SGDNesterov8bit": BuiltinOptimizer("bitsandbytes.optim", "SGD8bit", "bitsandbytes"),
    "DAdaptation": BuiltinOptimizer("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdamPreprint": BuiltinOptimizer("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdaGrad": BuiltinOptimizer("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "DAdaptAdam": BuiltinOptimizer("dadaptation", "DAdaptAdam", "dadaptation"),
    "DAdaptAdan": BuiltinOptimizer("dadaptation", "DAdaptAdan", "dadaptation"),
    "DAdaptAdanIP": BuiltinOptimizer("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "DAdaptLion": BuiltinOptimizer("dadaptation", "DAdaptLion", "dadaptation"),
    "DAdaptSGD": BuiltinOptimizer("dadaptation", "DAdaptSGD", "dadaptation"),
    "Prodigy": BuiltinOptimizer("prodigyopt", "Prodigy", "prodigyopt"),
    "Adafactor": BuiltinOptimizer("transformers.optimization", "Adafactor", "transformers"),
    "AdamWScheduleFree": BuiltinOptimizer("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "RAdamScheduleFree": BuiltinOptimizer("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "SGDScheduleFree": BuiltinOptimizer("schedulefree", "SGDScheduleFree", "schedulefree"),
    "ANLO": BuiltinOptimizer("library.hina_anlo", "ANLO", None),
    "HinaANLO": BuiltinOptimizer("library.hina_anlo", "ANLO", None),
}
_BUILTIN_BY_LOWER = {name.lower(): name for name in BUILTIN_OPTIMIZERS}

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)

_ARGS_EXAMPLE = "e.g. use_cautious_update=True, betas=0.9,0.999, weight_decay=0.01 or mode='global' (quote strings)"


def parse_key_value_args(values: Iterable[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` → ``{k: ast.literal_eval(v)}`` as sd-scripts reads ``--optimizer_args``.

    ``0.9,0.999`` becomes a tuple, ``True`` a bool, ``'text'`` a string; a bare word is an error. ``flag`` is
    the option's name, used in error messages.
    """
    if values is None:
        return {}
    if isinstance(values, str):
        raise TypeError(f"{flag} must be a list of key=value strings, got the string {values!r}")
    kwargs: dict[str, Any] = {}
    for item in values:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"{flag}: {item!r} is not key=value; expected {_ARGS_EXAMPLE}")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise ValueError(f"{flag}: {item!r} has no valid argument name before '='; expected {_ARGS_EXAMPLE}")
        try:
            kwargs[key] = ast.literal_eval(text.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as error:
            raise ValueError(
                f"{flag}: the value of {key!r} in {item!r} is not a Python literal; expected {_ARGS_EXAMPLE}"
            ) from error
    return kwargs


def _format_kwargs(kwargs: dict[str, Any]) -> str:
    """The ``k=v,k=v`` string sd-scripts logs and stores for the parsed optimizer arguments."""
    return ",".join(f"{key}={value}" for key, value in kwargs.items())


def optimizer_metadata_string(optimizer_name: str, optimizer_args: str) -> str:
    """The ``ss_optimizer`` metadata value: ``module.Class(k=v,...)``, or just ``module.Class`` without args."""
    return f"{optimizer_name}({optimizer_args})" if optimizer_args else optimizer_name


def resolve_optimizer_type(args: Any) -> str:
    """The optimizer the flags ask for: a ``BUILTIN_OPTIMIZERS`` key, or the user's class name as given."""
    optimizer_type = getattr(args, "optimizer_type", None) or ""
    legacy = [
        (flag, implied)
        for flag, implied, used in (("use_8bit_adam", "AdamW8bit", getattr(args, "use_8bit_adam", False)),
                                    ("use_lion_optimizer", "Lion", getattr(args, "use_lion_optimizer", False)))
        if used
    ]
    if len(legacy) == 2:
        raise ValueError("both --use_8bit_adam and --use_lion_optimizer are set; use --optimizer_type instead")
    if legacy:
        flag, implied = legacy[0]
        if optimizer_type and optimizer_type.lower() != implied.lower():
            raise ValueError(
                f"both --{flag} (means {implied}) and --optimizer_type {optimizer_type} are set; "
                f"use --optimizer_type alone"
            )
        optimizer_type = implied
    if not optimizer_type:
        return "AdamW"
    return _BUILTIN_BY_LOWER.get(optimizer_type.lower(), optimizer_type)


def _import_module(module: str, install_hint: str, purpose: str) -> ModuleType:
    """Import ``module``; on failure say what needs it and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the Python module {module!r}, which could not be imported ({error}); {install_hint}"
        ) from error


def _install_hint(pip_package: str | None, module: str) -> str:
    """How to obtain ``module``: a pip command, or a note that it belongs to this project."""
    if pip_package is None:
        return f"{module} is part of this project: check that the checkout is complete"
    return f"install it with: pip install {pip_package}"


def _optimizer_class(optimizer_type: str) -> type:
    """The class for a resolved optimizer type: built-in, ``torch.optim`` name, or dotted path."""
    purpose = f"--optimizer_type {optimizer_type}"
    if optimizer_type in BUILTIN_OPTIMIZERS:
        spec = BUILTIN_OPTIMIZERS[optimizer_type]
        module = _import_module(spec.module, _install_hint(spec.pip_package, spec.module), purpose)
        if not hasattr(module, spec.attr):
            raise ImportError(
                f"{purpose}: {spec.module} has no {spec.attr}; the installed {spec.pip_package} is too old, "
                f"upgrade it with: pip install -U {spec.pip_package}"
            )
        return getattr(module, spec.attr)

    if "." in optimizer_type:
        module_name, attr = optimizer_type.rsplit(".", 1)
        module = _import_module(module_name, f"install the package that provides {module_name!r}", purpose)
        where = f"module {module_name!r}"
    else:
        attr, module, where = optimizer_type, torch.optim, "torch.optim"
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ValueError(
            f"--optimizer_type {optimizer_type!r} is not a built-in optimizer and {where} has no class {attr!r} "
            f"(class names are case-sensitive). Built-in names (any case): {', '.join(BUILTIN_OPTIMIZERS)}; "
            f"or a torch.optim class such as SGD, or a dotted path such as pytorch_optimizer.CAME"
        )
    return cls


def _warn_adaptive_lr(lr: float | None, params: list[Any]) -> None:
    """D-Adaptation and Prodigy estimate the step size; they expect lr ≈ 1 and use only the first group's lr."""
    group_lrs = [group.get("lr", lr) for group in params if isinstance(group, dict)]
    first_lr = group_lrs[0] if group_lrs else lr
    if first_lr is not None and first_lr <= 0.1:
        logger.warning(f"learning rate {first_lr} is low for D-Adaptation / Prodigy; lr=1.0 is recommended")
    if len(set(group_lrs)) > 1:
        logger.warning(
            f"D-Adaptation / Prodigy with several learning rates (e.g. text encoder and U-Net): "
            f"only the first one, {first_lr}, takes effect"
        )


def _prepare_adafactor(args: Any, kwargs: dict[str, Any], lr: float | None, params: list[Any]) -> float | None:
    """Apply sd-scripts' Adafactor rules to ``kwargs``/``params``/``args``; return the lr to construct with."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; setting relative_step=True")
        kwargs["relative_step"] = True

    if not kwargs["relative_step"]:
        if getattr(args, "max_grad_norm", 1.0):
            logger.warning("Adafactor: --max_grad_norm is set, so gradients are clipped; consider --max_grad_norm 0")
        if getattr(args, "lr_scheduler", "constant") != "constant_with_warmup":
            logger.warning("Adafactor without relative_step works best with --lr_scheduler constant_with_warmup")
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            logger.warning("Adafactor: clip_threshold=1.0 is recommended")
        return lr

    if lr:
        logger.warning(f"Adafactor relative_step=True: --learning_rate {lr} is used only as the scheduler's initial lr")
    had_group_lr = False
    for group in params:
        if isinstance(group, dict) and group.pop("lr", None) is not None:
            had_group_lr = True
    if had_group_lr:
        logger.warning("Adafactor relative_step=True: --unet_lr and --text_encoder_lr are ignored")
        args.unet_lr = None
        args.text_encoder_lr = None
    args.learning_rate = None
    args.lr_scheduler = "adafactor" if lr is None else f"adafactor:{lr}"
    return None


def get_optimizer(args: Any, trainable_params: Iterable[Any]) -> tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer the flags ask for, exactly as sd-scripts does.

    ``trainable_params``: tensors, or parameter groups (``{"params": ..., "lr": ...}``) as returned by
    ``network.prepare_optimizer_params``. Returns ``(name, args_str, optimizer)``: ``name`` is the class's
    ``module.Class`` (e.g. ``torch.optim.adamw.AdamW``), ``args_str`` the parsed ``--optimizer_args`` as
    ``k=v,k=v`` including the defaults the factory adds (SGDNesterov's momentum, Adafactor's relative_step).
    """
    optimizer_type = resolve_optimizer_type(args)
    kwargs = parse_key_value_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    if "lr" in kwargs:
        raise ValueError("--optimizer_args must not set lr; use --learning_rate (and --unet_lr / --text_encoder_lr)")
    params = list(trainable_params)
    if not params:
        raise ValueError("get_optimizer: there are no trainable parameters")
    lr = args.learning_rate
    optimizer_class = _optimizer_class(optimizer_type)

    constructor_kwargs: dict[str, Any] = {}
    if optimizer_type in ("SGDNesterov", "SGDNesterov8bit"):
        if "nesterov" in kwargs:
            raise ValueError(
                f"--optimizer_type {optimizer_type} always uses nesterov=True; remove nesterov from --optimizer_args"
            )
        if "momentum" not in kwargs:
            logger.info(f"{optimizer_type} needs momentum; using momentum=0.9")
            kwargs["momentum"] = 0.9
        constructor_kwargs["nesterov"] = True
    elif optimizer_type.startswith("DAdapt") or optimizer_type == "Prodigy":
        _warn_adaptive_lr(lr, params)
    elif optimizer_type == "Adafactor":
        lr = _prepare_adafactor(args, kwargs, lr, params)

    logger.info(f"use {optimizer_type} optimizer | {kwargs}")
    class_path = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    try:
        optimizer = optimizer_class(params, lr=lr, **constructor_kwargs, **kwargs)
    except (TypeError, ValueError, IndexError, KeyError) as error:  # an unknown keyword, or a value of a wrong shape
        raise TypeError(
            f"--optimizer_type {optimizer_type}: {class_path} rejected its arguments "
            f"(--optimizer_args {_format_kwargs(kwargs) or '(none)'}): {type(error).__name__}: {error}"
        ) from error
    if is_schedulefree(optimizer):
        optimizer.train()
    return class_path, _format_kwargs(kwargs), optimizer


def with_param_names(groups: Iterable[Any], named_parameters: Iterable[tuple[str, torch.Tensor]]) -> list[Any]:
    """``groups`` with a ``param_names`` list added to every dict group that has none, looked up in
    ``named_parameters`` (the network's). Networks other than ours (LyCORIS, stock sd-scripts modules) hand over
    groups without names; with them ANLO finds each module's tensors. Groups holding a tensor that is not among
    ``named_parameters`` are left as they are."""
    name_of = {id(param): name for name, param in named_parameters}
    named = []
    for group in groups:
        if isinstance(group, dict) and "param_names" not in group:
            params = list(group["params"])
            group = {**group, "params": params}
            if all(id(param) in name_of for param in params):
                group["param_names"] = [name_of[id(param)] for param in params]
        named.append(group)
    return named


def is_schedulefree(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or the optimizer inside accelerate's wrapper) needs ``train()`` / ``eval()`` calls.

    Schedule-free optimizers evaluate the loss at one point and keep the weights to use at another; the trainer
    calls ``optimizer.train()`` before training steps and ``optimizer.eval()`` before sampling or saving.
    Plain ``torch.optim.Optimizer`` subclasses define neither method.
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def _scheduler_steps(value: int | float | None, flag: str, total_steps: int | None, num_processes: int) -> int:
    """``--lr_warmup_steps`` / ``--lr_decay_steps`` in scheduler steps.

    An int (or a whole float above 1) counts optimizer steps and is multiplied by ``num_processes``; a float
    from 0 to 1 is a fraction of ``total_steps`` (1.0 = all of them; ``library.config`` reads "10%" as 0.1).
    """
    expected = "a number of steps (int >= 0) or a fraction from 0 to 1"
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{flag} must be {expected}, got {value!r}")
    if isinstance(value, int):
        return value * num_processes
    if value <= 1:
        if total_steps is None:
            raise ValueError(f"{flag} {value} is a fraction of --max_train_steps, which is not set")
        return int(value * total_steps)
    if not value.is_integer():
        raise ValueError(f"{flag} must be {expected}, got {value!r}")
    return int(value) * num_processes


def get_scheduler(args: Any, optimizer: torch.optim.Optimizer, num_processes: int = 1) -> Any:
    """Build the learning-rate scheduler for ``optimizer`` (sd-scripts' ``get_scheduler_fix``).

    The trainer passes ``accelerator.num_processes``: a scheduler prepared by accelerate is stepped once per
    process for every optimizer step, so step counts are multiplied by it. Schedule-free optimizers get a
    constant schedule (they schedule internally; sd-scripts gives them a no-op scheduler).
    """
    if num_processes < 1:
        raise ValueError(f"get_scheduler: num_processes must be >= 1, got {num_processes}")
    name = (getattr(args, "lr_scheduler", None) or "constant").lower()
    scheduler_type = getattr(args, "lr_scheduler_type", None)
    kwargs = parse_key_value_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    max_train_steps = getattr(args, "max_train_steps", None)
    total_steps = None if max_train_steps is None else max_train_steps * num_processes
    warmup_value = getattr(args, "lr_warmup_steps", 0)
    warmup_steps = _scheduler_steps(warmup_value, "--lr_warmup_steps", total_steps, num_processes)
    decay_steps = _scheduler_steps(getattr(args, "lr_decay_steps", 0), "--lr_decay_steps", total_steps, num_processes)
    hf = _import_module("transformers.optimization", _install_hint("transformers", "transformers"), "--lr_scheduler")

    if is_schedulefree(optimizer):
        if name != "constant" or warmup_steps or scheduler_type:
            logger.warning(
                "schedule-free optimizers schedule internally: --lr_scheduler, --lr_scheduler_type and "
                "--lr_warmup_steps are ignored (use --optimizer_args warmup_steps=N)"
            )
        return hf.get_constant_schedule(optimizer)

    if scheduler_type:
        what = f"--lr_scheduler_type {scheduler_type}"
        _reject_warmup(what, warmup_value, warmup_steps)
        logger.info(f"use {scheduler_type} | {kwargs} as lr_scheduler")
        return _construct(_scheduler_class(scheduler_type), optimizer, kwargs, what)

    what = f"--lr_scheduler {name}"
    if name == "adafactor" or name.startswith("adafactor:"):
        _reject_warmup(f"{what} (what Adafactor with relative_step=True uses)", warmup_value, warmup_steps)
        return _adafactor_schedule(hf, name, optimizer)
    if name == "piecewise_constant":
        diffusers_optimization = _import_module(
            "diffusers.optimization", _install_hint("diffusers", "diffusers"), "--lr_scheduler piecewise_constant"
        )
        return _construct(diffusers_optimization.get_piecewise_constant_schedule, optimizer, kwargs, what)
    if name not in LR_SCHEDULERS:
        raise ValueError(
            f"--lr_scheduler {name!r} is not known; expected one of {', '.join(LR_SCHEDULERS)}, "
            f"or set --lr_scheduler_type to a scheduler class"
        )

    num_cycles = getattr(args, "lr_scheduler_num_cycles", 1)
    min_lr_ratio = getattr(args, "lr_scheduler_min_lr_ratio", None)
    named: dict[str, Any] = {"num_warmup_steps": warmup_steps}
    if name == "constant":
        _reject_warmup(what, warmup_value, warmup_steps)
        schedule, named = hf.get_constant_schedule, {}
    elif name == "constant_with_warmup":
        schedule = hf.get_constant_schedule_with_warmup
    elif name == "inverse_sqrt":
        schedule = hf.get_inverse_sqrt_schedule
        named["timescale"] = getattr(args, "lr_scheduler_timescale", None)
    elif total_steps is None:
        raise ValueError(f"{what} needs --max_train_steps")
    elif name == "warmup_stable_decay":
        schedule = hf.get_wsd_schedule
        named["num_stable_steps"] = total_steps - warmup_steps - decay_steps
        if named["num_stable_steps"] < 0:
            raise ValueError(
                f"{what}: --lr_warmup_steps + --lr_decay_steps ({warmup_steps} + {decay_steps} scheduler steps) "
                f"exceed the {total_steps} training steps"
            )
        named["num_decay_steps"] = decay_steps
        named["num_cycles"] = num_cycles / 2
        named["min_lr_ratio"] = 0.0 if min_lr_ratio is None else min_lr_ratio
    else:
        named["num_training_steps"] = total_steps
        if name == "linear":
            schedule = hf.get_linear_schedule_with_warmup
        elif name == "cosine":
            schedule = hf.get_cosine_schedule_with_warmup
        elif name == "cosine_with_restarts":
            schedule = hf.get_cosine_with_hard_restarts_schedule_with_warmup
            named["num_cycles"] = num_cycles
        elif name == "polynomial":
            schedule = hf.get_polynomial_decay_schedule_with_warmup
            named["power"] = getattr(args, "lr_scheduler_power", 1.0)
        else:  # cosine_with_min_lr
            if min_lr_ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
                raise ValueError(f"{what} needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
            schedule = hf.get_cosine_with_min_lr_schedule_with_warmup
            named["num_cycles"] = num_cycles / 2
            if min_lr_ratio is not None:
                named["min_lr_rate"] = min_lr_ratio
    return _construct(schedule, optimizer, {**named, **kwargs}, what)


def _reject_warmup(what: str, warmup_value: Any, warmup_steps: int) -> None:
    """sd-scripts refuses a warmup for schedules that cannot apply one; so do we."""
    if warmup_steps:
        raise ValueError(
            f"{what} takes no warmup, but --lr_warmup_steps is {warmup_value}; set --lr_warmup_steps 0 "
            f"(for a warmup use --lr_scheduler constant_with_warmup)"
        )


def _scheduler_class(path: str) -> type:
    """``--lr_scheduler_type``: a class of ``torch.optim.lr_scheduler``, or ``package.module.Class``."""
    if "." in path:
        module_name, attr = path.rsplit(".", 1)
        hint = f"install the package that provides {module_name!r}"
        module = _import_module(module_name, hint, f"--lr_scheduler_type {path}")
    else:
        module, attr = torch.optim.lr_scheduler, path
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ValueError(
            f"--lr_scheduler_type {path!r}: {module.__name__} has no class {attr!r} (names are case-sensitive); "
            f"give a class of torch.optim.lr_scheduler such as StepLR, or a dotted path package.module.Class"
        )
    return cls


def _construct(factory: Any, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any], what: str) -> Any:
    """``factory(optimizer, **kwargs)``, with a message naming the flag when the arguments do not fit."""
    try:
        return factory(optimizer, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"{what}: the scheduler rejected the arguments {kwargs} (see --lr_scheduler_args): {error}"
        ) from error


def _adafactor_schedule(hf: ModuleType, name: str, optimizer: torch.optim.Optimizer) -> Any:
    """transformers' ``AdafactorSchedule`` for ``adafactor`` / ``adafactor:<initial lr>``."""
    if not isinstance(optimizer, hf.Adafactor):
        raise ValueError(
            f"--lr_scheduler adafactor works only with --optimizer_type Adafactor, not {type(optimizer).__name__}"
        )
    try:
        initial_lr = float(name.partition(":")[2] or 0.0)
    except ValueError as error:
        raise ValueError(f"--lr_scheduler {name!r}: expected adafactor:<initial lr>, e.g. adafactor:0.001") from error
    return hf.AdafactorSchedule(optimizer, initial_lr)
