"""The LoRA-quality benchmark: its smoke mode, the summary arithmetic and the stateless variants it compares."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch

pytest.importorskip("sklearn", reason="the quality benchmark trains on scikit-learn's digits")
from sklearn.datasets import load_digits  # noqa: E402

from benchmarks import lora_quality as lq  # noqa: E402
from benchmarks import stateless_variants as sv  # noqa: E402
from library.hina_anlo import ANLO  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, str]:
    out = tmp_path_factory.mktemp("quality")
    threads = torch.get_num_threads()
    try:
        code = lq.main(["--smoke", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert (out / "lora_quality.png").read_bytes().startswith(b"\x89PNG")
    return code, json.loads((out / "lora_quality.json").read_text()), (out / "lora_quality.md").read_text()


@pytest.mark.slow
def test_smoke_run_succeeds_with_finite_curves_and_a_table(smoke: tuple[int, dict, str]) -> None:
    code, report, table = smoke
    assert code == 0
    runs = report["runs"]
    assert {(r["label"], r["lr"]) for r in runs} == {(o, lr) for o in lq.SMOKE_OPTIMIZERS for lr in lq.SMOKE_LRS}
    for r in runs:
        assert r["steps"] == [0, 5, 10]
        assert all(math.isfinite(x) for x in r["losses"])
    assert len({r["losses"][0] for r in runs}) == 1  # every run starts from the same pretrained model
    for label in lq.SMOKE_OPTIMIZERS:
        assert f"| {label} |" in table


@pytest.mark.slow
def test_smoke_run_on_another_concept_and_image_size(tmp_path) -> None:
    threads = torch.get_num_threads()
    try:
        code = lq.main(["--smoke", "--out", str(tmp_path), "--optimizers", "AdamW", "--concept", "3",
                        "--image_size", "16"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    report = json.loads((tmp_path / "lora_quality.json").read_text())
    assert (report["config"]["concept"], report["config"]["image_size"]) == (3, 16)
    threes = int((load_digits().target == 3).sum())  # 183 scans of a 3
    assert f"100 training / {threes - 100} held-out 3s, 16² px (base: 5 steps)" in (tmp_path / "lora_quality.md").read_text()
    assert all(math.isfinite(x) for r in report["runs"] for x in r["losses"])


def test_setup_teaches_the_held_out_concept_at_the_requested_size(tmp_path, monkeypatch) -> None:
    from benchmarks import digits_unet

    config = digits_unet.DigitsConfig(concept=3, image_size=16)
    monkeypatch.setattr(lq, "pretrained_unet", lambda config, cache_dir: None)  # the data split only
    setup = lq.make_setup(config, tmp_path, draws_per_image=2)
    images, labels = digits_unet.load_digit_images(16)
    threes = images[labels == 3]
    assert setup.train_images.shape == (lq.TRAIN_IMAGES, 1, 16, 16)
    assert len(setup.val_images) == 2 * (len(threes) - lq.TRAIN_IMAGES)
    flat = threes.flatten(1)
    for image in torch.cat([setup.train_images, setup.val_images]).flatten(1):
        assert (flat == image).all(dim=1).any()  # every training and validation image is a 3
    torch.testing.assert_close(setup.context[0], digits_unet.caption_embeddings(config)[3])


def test_native_size_is_the_raw_scans_and_larger_sizes_are_bilinear() -> None:
    from benchmarks.digits_unet import load_digit_images

    raw = torch.from_numpy(load_digits().images).float()
    images, labels = load_digit_images(8)
    torch.testing.assert_close(images[:, 0], raw / 8.0 - 1.0)  # 0..16 → [-1, 1], untouched by the resize
    large, _ = load_digit_images(16)
    # align_corners=False at 2×: each output pixel is 3/4 of its nearest input pixel and 1/4 of the next one
    # (edge pixels repeat); pixel (5, 5) of the output sits between input pixels 2 and 3 on both axes.
    a, b = raw[:, 2], raw[:, 3]
    expected = 0.75 * (0.75 * a[:, 2] + 0.25 * a[:, 3]) + 0.25 * (0.75 * b[:, 2] + 0.25 * b[:, 3])
    torch.testing.assert_close(large[:, 0, 5, 5], (expected / 16.0).clamp(0, 1) * 2 - 1)


def test_cache_key_tells_concepts_and_image_sizes_apart() -> None:
    from benchmarks.digits_unet import DigitsConfig

    keys = {DigitsConfig(concept=c, image_size=s).cache_key() for c in (3, 9) for s in (8, 16)}
    keys.add(DigitsConfig(pretrain_steps=300).cache_key())
    assert len(keys) == 5
    assert DigitsConfig().cache_key() == DigitsConfig(concept=9, image_size=8).cache_key()


def test_concept_image_size_and_pretrain_steps_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    args = lq.parse_args([])
    assert (args.concept, args.image_size, args.pretrain_steps) == (9, 8, 1500)
    with pytest.raises(SystemExit):
        lq.parse_args(["--pretrain_steps", "0"])
    assert "--pretrain_steps: expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lq.parse_args(["--concept", "10"])
    assert "--concept: expected a digit 0..9, got 10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lq.parse_args(["--image_size", "15"])
    assert "--image_size: expected an even number of px >= 8, got 15" in capsys.readouterr().err


def test_steps_to_reach_is_the_first_step_at_or_below_target() -> None:
    assert lq.steps_to_reach([0, 10, 20, 30], [1.0, 0.7, 0.5, 0.6], 0.5) == 20
    assert lq.steps_to_reach([0, 10], [1.0, 0.7], 0.5) is None


def _run(label: str, lr: float, seed: int, losses: list[float]) -> lq.RunResult:
    return lq.RunResult(label, lr, seed, [0, 10, 20, 30], losses, 0.0)


def test_lr_text_keeps_the_digit_that_tells_grid_points_apart() -> None:
    assert [lq.lr_text(lr) for lr in (3e-3, 1.5e-3, 2e-3, 7e-4)] == ["3e-03", "1.5e-03", "2e-03", "7e-04"]


def test_summary_picks_best_lr_by_final_loss_and_counts_steps_to_adamw_best() -> None:
    results = [
        _run("AdamW", 1e-4, 0, [1.0, 0.9, 0.8, 0.7]),
        _run("AdamW", 1e-3, 0, [1.0, 0.8, 0.6, 0.5]),
        _run("AdamW", 1e-3, 1, [1.0, 0.8, 0.6, 0.7]),  # mean final 0.6, best mean 0.6 at step 20
        _run("X", 1e-4, 0, [1.0, 0.6, 0.55, 0.55]),
        _run("X", 1e-3, 0, [1.0, 0.5, 0.6, 0.9]),
    ]
    rows = {row.label: row for row in lq.summarize(results, (1e-4, 1e-3))}
    adamw, x = rows["AdamW"], rows["X"]
    assert adamw.best_lr == 1e-3 and adamw.final_mean == pytest.approx(0.6)
    assert adamw.final_std == pytest.approx(0.1 * math.sqrt(2))
    assert adamw.steps_to_target == 20 and adamw.ratio_to_adamw == pytest.approx(1.0)
    assert x.best_lr == 1e-4 and x.steps_to_target == 10 and x.ratio_to_adamw == pytest.approx(0.5)
    assert "| X | 1e-04 | 0.55000 ± 0.00000 | -8.33 % |" in lq.markdown_table(list(rows.values()))


def test_unknown_optimizer_label_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        lq.parse_args(["--optimizers", "AdamW", "Adam"])
    assert "--optimizers: unknown label(s) ['Adam']" in capsys.readouterr().err


def test_variant_seeds_default_to_seeds_and_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert lq.parse_args(["--seeds", "4"]).variant_seeds == 4
    assert lq.parse_args(["--seeds", "4", "--variant_seeds", "2"]).variant_seeds == 2
    with pytest.raises(SystemExit):
        lq.parse_args(["--variant_seeds", "0"])
    assert "--variant_seeds: expected a positive integer, got 0" in capsys.readouterr().err


def test_rank_and_alpha_default_to_the_table_and_alpha_to_half_a_given_rank(capsys: pytest.CaptureFixture[str]) -> None:
    args = lq.parse_args([])
    assert (args.rank, args.alpha) == (lq.NETWORK_DIM, lq.NETWORK_ALPHA)
    args = lq.parse_args(["--rank", "32"])
    assert (args.rank, args.alpha) == (32, 16.0)
    assert lq.parse_args(["--rank", "32", "--alpha", "32"]).alpha == 32.0
    with pytest.raises(SystemExit):
        lq.parse_args(["--rank", "0"])
    assert "--rank: expected a positive integer, got 0" in capsys.readouterr().err


def test_attach_lora_builds_the_requested_rank_and_alpha() -> None:
    from benchmarks.digits_unet import DigitsConfig, build_unet

    network = lq.attach_lora(build_unet(DigitsConfig()), seed=0, rank=5, alpha=2.5)
    assert network.unet_loras and all(
        lora.lora_down.weight.shape[0] == 5 and lora.scale == 0.5 for lora in network.unet_loras
    )


def _lora_groups(rank: int = 3) -> list[dict]:
    """Two kohya-named LoRA modules (a Linear and a 3×3 conv) with gradients; the conv's ``lora_up`` sits in a
    group of its own, as with LoRA+."""
    torch.manual_seed(0)
    shapes = {"lin": ((rank, 5), (4, rank)), "conv": ((rank, 2, 3, 3), (6, rank, 1, 1))}
    params = {}
    for module, (down_shape, up_shape) in shapes.items():
        for factor, shape in (("lora_down", down_shape), ("lora_up", up_shape)):
            p = torch.nn.Parameter(torch.randn(shape))
            p.grad = torch.randn(shape)
            params[f"lora_unet_{module}.{factor}.weight"] = p
    plus = "lora_unet_conv.lora_up.weight"
    main = {name: p for name, p in params.items() if name != plus}
    return [
        {"params": list(main.values()), "param_names": list(main)},
        {"params": [params[plus]], "param_names": [plus]},
    ]


def test_lora_pairs_pair_each_modules_down_and_up_across_groups() -> None:
    groups = _lora_groups()
    names = {id(p): n for g in groups for n, p in zip(g["param_names"], g["params"])}
    pairs = [(names[id(down)], names[id(up)]) for down, up in sv.lora_pairs(groups)]
    assert pairs == [
        ("lora_unet_lin.lora_down.weight", "lora_unet_lin.lora_up.weight"),
        ("lora_unet_conv.lora_down.weight", "lora_unet_conv.lora_up.weight"),
    ]


def test_riemannian_preconditioner_matches_the_explicit_inverses() -> None:
    delta = 1e-2
    for down, up in sv.lora_pairs(_lora_groups()):
        r = down.shape[0]
        d, u = down.detach().reshape(r, -1).double(), up.detach().reshape(-1, r).double()
        eye = torch.eye(r, dtype=torch.float64)
        grad_down, grad_up = down.grad.reshape(r, -1).double(), up.grad.reshape(-1, r).double()
        expected_down = torch.linalg.inv(u.T @ u + delta * eye) @ grad_down
        expected_up = grad_up @ torch.linalg.inv(d @ d.T + delta * eye)
        sv.riemannian_precondition_(down, up, delta)
        torch.testing.assert_close(down.grad.reshape(r, -1).double(), expected_down, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(up.grad.reshape(-1, r).double(), expected_up, rtol=1e-4, atol=1e-5)


def _msign(matrix: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def _inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(gram)
    return u @ torch.diag(s.rsqrt()) @ u.T


def test_lora_muon_matches_the_papers_formulas_computed_by_svd() -> None:
    for down, up in sv.lora_pairs(_lora_groups()):
        r = down.shape[0]
        d, u = down.detach().reshape(r, -1).double(), up.detach().reshape(-1, r).double()
        r_down, r_up = _inverse_sqrt(d @ d.T), _inverse_sqrt(u.T @ u)
        expected_up = _msign(up.grad.reshape(-1, r).double() @ r_down) @ r_down
        expected_down = r_up @ _msign(r_up @ down.grad.reshape(r, -1).double())
        sv.lora_muon_(down, up, relative_floor=1e-6)  # the damping negligible: the exact formulas
        torch.testing.assert_close(up.grad.reshape(-1, r).double(), expected_up, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(down.grad.reshape(r, -1).double(), expected_down, rtol=1e-4, atol=1e-5)


def test_lora_muon_changes_the_product_alike_however_the_factors_share_its_scale() -> None:
    """``up · c`` and ``down / c`` make the same product; one LoRAMuonSGD step changes it by the same amount
    (a factor-wise step, ANLO's orthogonalize, does not)."""
    torch.manual_seed(0)
    grad_of_product = torch.randn(6, 9, dtype=torch.float64)
    down0, up0 = torch.randn(3, 9, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def product_change(scale: float, optimizer: type) -> torch.Tensor:
        down = torch.nn.Parameter(down0 / scale)
        up = torch.nn.Parameter(up0 * scale)
        down.grad, up.grad = up.detach().T @ grad_of_product, grad_of_product @ down.detach().T
        names = ["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"]
        if optimizer is sv.LoRAMuonSGD:
            sv.LoRAMuonSGD([{"params": [down, up], "param_names": names}], lr=0.1).step()
        else:
            ANLO([{"params": [down, up], "param_names": names}], lr=0.1, orthogonalize=True).step()
        return (up @ down - up0 @ down0).detach()

    torch.testing.assert_close(product_change(10.0, sv.LoRAMuonSGD), product_change(1.0, sv.LoRAMuonSGD))
    assert not torch.allclose(product_change(10.0, ANLO), product_change(1.0, ANLO), rtol=0.1)


def test_lora_muon_sgd_steps_by_half_the_lr_along_the_directions() -> None:
    groups, reference_groups = _lora_groups(), _lora_groups()
    sv.LoRAMuonSGD(groups, lr=0.2).step()
    for down, up in sv.lora_pairs(reference_groups):
        sv.lora_muon_(down, up)
        with torch.no_grad():
            down.sub_(0.1 * down.grad)
            up.sub_(0.1 * up.grad)
    for group, reference in zip(groups, reference_groups):
        for p, q in zip(group["params"], reference["params"]):
            torch.testing.assert_close(p, q)


def test_normalize_tensors_gives_each_tensor_unit_rms() -> None:
    for down, up in sv.lora_pairs(_lora_groups()):
        up.grad.mul_(100.0)
        sv.normalize_tensors_(down, up)
        for grad in (down.grad, up.grad):
            torch.testing.assert_close(grad.square().mean(), torch.tensor(1.0))


def test_row_normalize_tensors_gives_every_row_unit_rms() -> None:
    for down, up in sv.lora_pairs(_lora_groups()):
        expected = []
        for grad in (down.grad, up.grad):
            grad[0].mul_(1e3)  # rows of very different scale
            matrix = grad.reshape(grad.shape[0], -1).double()
            expected.append(matrix / matrix.square().mean(dim=1, keepdim=True).sqrt())
        sv.row_normalize_tensors_(down, up)
        for grad, reference in zip((down.grad, up.grad), expected):
            torch.testing.assert_close(grad.reshape(grad.shape[0], -1).double(), reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_pair_transform_anlo_is_anlo_on_the_transformed_gradients(per_tensor: bool) -> None:
    groups, reference_groups = _lora_groups(), _lora_groups()
    for down, up in sv.lora_pairs(reference_groups):
        sv.riemannian_precondition_(down, up, 1e-6)
    transform = partial(sv.riemannian_precondition_, delta=1e-6)
    optimizer = sv.PairTransformANLO(groups, transform, per_tensor=per_tensor, lr=1e-2)
    optimizer.step()
    if per_tensor:
        reference_groups = [{k: v for k, v in g.items() if k != "param_names"} for g in reference_groups]
    ANLO(reference_groups, lr=1e-2).step()
    for group, reference in zip(groups, reference_groups):
        for p, q in zip(group["params"], reference["params"]):
            torch.testing.assert_close(p, q)
    # per tensor: ANLO gets no names, so each tensor is its own layer in the layer-norm steps
    assert all(("param_names" in g) != per_tensor for g in optimizer.param_groups)


@pytest.mark.slow
def test_learning_rate_free_rows_run_at_their_own_lr(tmp_path) -> None:
    labels = ["AdamW", "ANLO lr_free x1", "ANLO lr_free bound x2 per-tensor", "Prodigy safeguard+warmup", "DAdaptAdam",
              "AdamW schedule-free"]
    threads = torch.get_num_threads()
    try:
        code = lq.main(["--smoke", "--out", str(tmp_path), "--optimizers", *labels])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    runs = json.loads((tmp_path / "lora_quality.json").read_text())["runs"]
    lrs = {label: sorted({r["lr"] for r in runs if r["label"] == label}) for label in labels}
    assert lrs["ANLO lr_free x1"] == [1.0] and lrs["ANLO lr_free bound x2 per-tensor"] == [2.0]
    assert lrs["Prodigy safeguard+warmup"] == [1.0] and lrs["DAdaptAdam"] == [1.0]
    assert lrs["AdamW schedule-free"] == list(lq.SMOKE_LRS)  # on the grid, like AdamW
    for r in runs:  # every row trained: its loss moved from the pretrained model's
        assert r["losses"][-1] != r["losses"][0]


def test_warmup_rows_ramp_the_lr_linearly() -> None:
    spec = lq.optimizer_specs()["Prodigy safeguard+warmup"]
    assert spec.warmup_steps == lq.WARMUP_STEPS == 15 and spec.lrs == (1.0,) and not spec.cosine
    factors = [lq.lr_factor(step, 15) for step in range(17)]
    assert factors[0] == pytest.approx(1 / 15) and factors[7] == pytest.approx(8 / 15)
    assert factors[14:] == [1.0, 1.0, 1.0]


def test_cosine_rows_decay_to_zero_after_the_warmup() -> None:
    specs = lq.optimizer_specs()
    assert specs["AdamW warmup+cosine"].cosine and specs["AdamW warmup+cosine"].warmup_steps == 15
    assert specs["ANLO lr_free x1 cosine"].cosine and specs["ANLO lr_free x1 cosine"].warmup_steps == 0
    # against torch's own cosine annealing (eta_min 0) over the 135 steps after a 15-step warm-up
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=1.0)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=135)
    expected = []
    for _ in range(135):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        annealing.step()
    factors = [lq.lr_factor(step, 15, 150) for step in range(150)]
    assert factors[:15] == pytest.approx([(k + 1) / 15 for k in range(15)])
    assert factors[15:] == pytest.approx(expected, abs=1e-12)
    assert lq.lr_factor(0, 0, 150) == 1.0
    assert lq.lr_factor(149, 0, 150) == pytest.approx(0.5 * (1 + math.cos(math.pi * 149 / 150)))
