"""ANLO under data parallelism: two CPU processes (gloo) step on different data after an all-reduce of
the gradients and must end with identical weights, equal to one process stepping on the averaged
gradients. A bfloat16 tensor checks that stochastic rounding draws the same numbers on every rank."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port  # tests/helpers.py
from library.hina_anlo import ANLO

WORLD_SIZE = 2
STEPS = 6


def _lora() -> torch.nn.ModuleDict:
    down, up = torch.nn.Linear(8, 2, bias=False), torch.nn.Linear(2, 8, bias=False)
    return torch.nn.ModuleDict({"lora_down": down, "lora_up": up})


def _model() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"q": _lora(), "v": _lora()})
    model["v"].to(torch.bfloat16)
    return model


def _optimizer(model: torch.nn.ModuleDict) -> ANLO:
    named = list(model.named_parameters())
    ups = [(n, p) for n, p in named if "lora_up" in n]
    downs = [(n, p) for n, p in named if "lora_up" not in n]
    groups = [{"params": downs}, {"params": ups, "lr": 4e-2}]  # LoRA+-style split of each module
    # coupled decay: the cautious gate can fire, so its counters are compared across ranks too
    return ANLO(groups, lr=1e-2, weight_decay=0.05, decoupled_weight_decay=False, use_cautious_update=True,
                normalization="alternating", normalize_frequency=2)


def _gradients(model: torch.nn.ModuleDict, rank: int, step: int) -> list[torch.Tensor]:
    """This rank's gradients for this step (each rank sees different data)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 8, generator=gen)
    target = torch.randn(4, 8, generator=gen)
    model.zero_grad(set_to_none=True)
    out = sum(m["lora_up"](m["lora_down"](x.to(m["lora_down"].weight.dtype))).float() for m in model.values())
    torch.nn.functional.mse_loss(out, target).backward()
    return [p.grad.clone() for p in model.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model = _model()
        opt = _optimizer(model)
        for step in range(STEPS):
            for p, g in zip(model.parameters(), _gradients(model, rank, step)):
                dist.all_reduce(g)
                p.grad = g / WORLD_SIZE
            opt.step()
        torch.save([p.detach() for p in model.parameters()], Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_ranks_end_identical(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    # One process, same arithmetic: sum the ranks' gradients (gloo sums two operands, and a + b == b + a
    # exactly), divide by the world size, step.
    model = _model()
    initial = [p.detach().clone() for p in model.parameters()]
    opt = _optimizer(model)
    for step in range(STEPS):
        per_rank = [_gradients(model, rank, step) for rank in range(WORLD_SIZE)]
        for p, *grads in zip(model.parameters(), *per_rank):
            p.grad = sum(grads[1:], grads[0]) / WORLD_SIZE
        opt.step()

    for a, b, single, start in zip(*ranks, model.parameters(), initial):
        assert torch.equal(a, b)
        assert torch.equal(a, single.detach())
        assert not torch.equal(a, start)
    assert ranks[0][-1].dtype == torch.bfloat16
