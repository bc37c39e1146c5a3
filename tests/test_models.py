"""Model loading: embedded tiny models, diffusers folders, LDM/SGM single files, --vae, flags and errors.

Every test runs with outgoing network connections blocked (``no_network``), so a download attempt fails loudly.
"""

from __future__ import annotations

import socket
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from library import config, ldm_convert, models, tiny_models
from tools.make_tiny_model import make_tiny_model

KINDS = {"tiny-sd1": "sd1", "tiny-sdxl": "sdxl"}


def _refuse_connection(*args: Any, **kwargs: Any) -> None:
    raise OSError("network access attempted during a model-loading test")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse_connection)
    monkeypatch.setattr(socket, "create_connection", _refuse_connection)


def make_args(name_or_path: str | Path, **overrides: Any) -> Namespace:
    """The loading flags with the parser's defaults."""
    values = dict(
        pretrained_model_name_or_path=str(name_or_path),
        pretrained_model_config=None,
        v2=False,
        v_parameterization=False,
        vae=None,
        clip_skip=None,
        max_token_length=None,
        tokenizer_cache_dir=None,
        lowram=False,
        sdpa=False,
        xformers=False,
        seed=None,
    )
    values.update(overrides)
    return Namespace(**values)


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    """The embedded models' components, built directly."""
    return {name: tiny_models.build_tiny(name, models.EMBEDDED_MODEL_SEED) for name in KINDS}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """``name → (diffusers folder, single file)`` written by tools/make_tiny_model.py."""
    root = tmp_path_factory.mktemp("exported")
    paths = {}
    for name, kind in KINDS.items():
        folder, single = root / name, root / f"{name}.safetensors"
        make_tiny_model(kind, folder, single)
        paths[name] = (folder, single)
    return paths


@torch.no_grad()
def component_outputs(parts: dict[str, Any], tokenizers: list[Any]) -> dict[str, torch.Tensor]:
    """U-Net, VAE and text-encoder outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(1)
    unet, vae = parts["unet"], parts["vae"]
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {
            "text_embeds": torch.randn(1, 32, generator=generator),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
        }
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    outputs = {
        "unet": unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample,
        "vae_mean": vae.encode(image).latent_dist.mean,
        "vae_decoded": vae.decode(sample).sample,
    }
    encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if "text_encoder_2" in parts else [])
    for i, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers)):
        ids = tokenizer("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
        result = encoder(ids, output_hidden_states=True)
        outputs[f"te{i}_hidden"] = result.hidden_states[-2]
        outputs[f"te{i}_last"] = result.last_hidden_state
        if hasattr(result, "text_embeds"):
            outputs[f"te{i}_projected"] = result.text_embeds
    return outputs


def bundle_parts(bundle: models.ModelBundle) -> dict[str, Any]:
    parts = {"unet": bundle.unet, "vae": bundle.vae, "text_encoder": bundle.text_encoders[0]}
    if bundle.is_sdxl:
        parts["text_encoder_2"] = bundle.text_encoders[1]
    return parts


@pytest.fixture(scope="module")
def reference_outputs(reference: dict[str, dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    """The embedded models' outputs on the fixed inputs, computed once."""
    outputs = {}
    for name, parts in reference.items():
        tokenizers = [parts["tokenizer"]] + ([parts["tokenizer_2"]] if "tokenizer_2" in parts else [])
        outputs[name] = component_outputs(parts, tokenizers)
    return outputs


def assert_same_outputs(bundle: models.ModelBundle, expected: dict[str, torch.Tensor], atol: float) -> None:
    actual = component_outputs(bundle_parts(bundle), bundle.tokenizers)
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=f"{key} differs")


# --- embedded models ---------------------------------------------------------------------------------------------


def test_network_is_blocked_in_this_module() -> None:
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("huggingface.co", 443))


def test_embedded_sd1_bundle() -> None:
    bundle = models.load_models(make_args("tiny-sd1"))
    assert not bundle.is_sdxl and not bundle.v2 and not bundle.v_parameterization
    assert bundle.model_version == "sd_v1"
    assert bundle.latent_scale == pytest.approx(0.18215)
    assert len(bundle.text_encoders) == 1 and len(bundle.tokenizers) == 1
    assert bundle.name_or_path == "tiny-sd1"
    with torch.no_grad():
        latents = bundle.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_embedded_sdxl_bundle() -> None:
    bundle = models.load_models(make_args("tiny-sdxl"), sdxl=True)
    assert bundle.is_sdxl and bundle.model_version == "sdxl_base_v1-0"
    assert bundle.latent_scale == pytest.approx(0.13025)
    assert len(bundle.text_encoders) == 2 and len(bundle.tokenizers) == 2
    assert isinstance(bundle.text_encoders[1], CLIPTextModelWithProjection)
    assert bundle.unet.config.addition_embed_type == "text_time"


def test_noise_scheduler_is_the_training_schedule() -> None:
    scheduler = models.load_models(make_args("tiny-sd1")).noise_scheduler
    # scaled_linear: betas evenly spaced in sqrt space between 0.00085 and 0.012
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.betas.double(), expected, atol=0, rtol=1e-6)
    assert scheduler.config.clip_sample is False
    assert scheduler.config.prediction_type == "epsilon"


def test_v_parameterization_sets_prediction_type() -> None:
    bundle = models.load_models(make_args("tiny-sd1", v_parameterization=True))
    assert bundle.v_parameterization
    assert bundle.noise_scheduler.config.prediction_type == "v_prediction"


def test_v2_on_an_sd1_model_is_an_error() -> None:
    """sd-scripts fails to load an SD 1.x file with --v2; here the run would train SD 1.x with SD 2 metadata."""
    with pytest.raises(ValueError, match=r"--v2 is set, but tiny-sd1 is an SD 1\.x model \(its text encoder is "
                                         r"CLIP ViT-L, not SD 2\.x's OpenCLIP\); remove --v2"):
        models.load_models(make_args("tiny-sd1", v2=True))


def test_embedded_weights_do_not_depend_on_args_seed(reference: dict[str, dict[str, Any]]) -> None:
    bundle = models.load_models(make_args("tiny-sd1", seed=1234))
    for key, tensor in reference["tiny-sd1"]["unet"].state_dict().items():
        assert torch.equal(bundle.unet.state_dict()[key], tensor), key


@pytest.mark.parametrize("name", KINDS)
def test_loading_an_embedded_model_leaves_the_random_state_to_args_seed(name: str) -> None:
    """The weights come from their own seed, and what follows the load (the LoRA's initialisation, the noise)
    still draws from the state ``--seed`` set: two different seeds draw differently after the load."""
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = torch.get_rng_state()
        models.load_models(make_args(name), sdxl=KINDS[name] == "sdxl")
        assert torch.equal(torch.get_rng_state(), expected)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])


def test_clip_skip_and_max_token_length_are_stored() -> None:
    bundle = models.load_models(make_args("tiny-sd1", clip_skip=2, max_token_length=225))
    assert bundle.clip_skip == 2 and bundle.max_token_length == 225


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_token_length": 100}, "--max_token_length must be one of 75, 150, 225"),
        ({"clip_skip": 0}, "--clip_skip must be 1 or more"),
    ],
)
def test_bad_flag_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.load_models(make_args("tiny-sd1", **overrides))


def test_model_family_must_match_the_trainer() -> None:
    with pytest.raises(ValueError, match="tiny-sdxl is an SDXL model; use sdxl_train_network.py"):
        models.load_models(make_args("tiny-sdxl"), sdxl=False)
    with pytest.raises(ValueError, match="tiny-sd1 is not an SDXL model .*use train_network.py"):
        models.load_models(make_args("tiny-sd1"), sdxl=True)


def test_sdpa_sets_attention_processors() -> None:
    bundle = models.load_models(make_args("tiny-sd1", sdpa=True))
    processors = list(bundle.unet.attn_processors.values()) + list(bundle.vae.attn_processors.values())
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)


def test_xformers_without_the_package_is_a_clear_error() -> None:
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="--xformers needs the xformers package"):
            models.load_models(make_args("tiny-sd1", xformers=True))
    else:
        pytest.skip("xformers is installed")


def test_arguments_from_the_real_parser() -> None:
    args = config.build_parser(sdxl=False).parse_args(
        ["--pretrained_model_name_or_path", "tiny-sd1", "--v_parameterization", "--clip_skip", "2"]
    )
    bundle = models.load_models(args)
    assert bundle.noise_scheduler.config.prediction_type == "v_prediction" and bundle.clip_skip == 2


# --- diffusers folders and single files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KINDS))
def test_diffusers_folder_round_trip(name: str, exported: dict, reference_outputs: dict) -> None:
    folder, _ = exported[name]
    bundle = models.load_models(make_args(folder), sdxl=name == "tiny-sdxl")
    assert bundle.model_version == ("sdxl_base_v1-0" if name == "tiny-sdxl" else "sd_v1")
    assert bundle.name_or_path == str(folder)
    assert_same_outputs(bundle, reference_outputs[name], atol=1e-6)


@pytest.mark.parametrize("name", list(KINDS))
def test_single_file_round_trip(name: str, exported: dict, reference_outputs: dict) -> None:
    _, single = exported[name]
    bundle = models.load_models(make_args(single), sdxl=name == "tiny-sdxl")
    assert bundle.is_sdxl == (name == "tiny-sdxl")
    assert_same_outputs(bundle, reference_outputs[name], atol=1e-5)


def test_sd1_single_file_layout(exported: dict, reference: dict) -> None:
    state = load_file(exported["tiny-sd1"][1])
    ref = reference["tiny-sd1"]
    assert torch.equal(state["model.diffusion_model.input_blocks.0.0.weight"], ref["unet"].conv_in.weight)
    assert torch.equal(state["model.diffusion_model.out.2.weight"], ref["unet"].conv_out.weight)
    resnet = ref["unet"].down_blocks[1].resnets[0]
    skip = state["model.diffusion_model.input_blocks.4.0.skip_connection.weight"]
    assert torch.equal(skip, resnet.conv_shortcut.weight)
    # VAE attention: 1×1 conv weights in LDM, Linear in diffusers
    to_q = ref["vae"].encoder.mid_block.attentions[0].to_q.weight
    q = state["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape == (*to_q.shape, 1, 1) and torch.equal(q[:, :, 0, 0], to_q)
    # diffusers' last up block is LDM's level 0
    up_conv = ref["vae"].decoder.up_blocks[0].upsamplers[0].conv.weight
    assert torch.equal(state["first_stage_model.decoder.up.3.upsample.conv.weight"], up_conv)
    te_q = ref["text_encoder"].state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(state["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"], te_q)
    with safe_open(str(exported["tiny-sd1"][1]), framework="pt") as handle:
        assert handle.metadata()[models.EMBEDDED_CONFIG_METADATA_KEY] == "tiny-sd1"


def test_vae_with_channel_changes_matches_diffusers_reader(tmp_path: Path) -> None:
    """Widths that change between levels give resnet shortcuts (LDM ``nin_shortcut``), as in the real SD VAE."""
    torch.manual_seed(3)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        norm_num_groups=16,
    )
    state = ldm_convert.vae_to_ldm(vae.state_dict(), vae.config)
    assert "encoder.down.1.block.0.nin_shortcut.weight" in state
    assert "decoder.up.0.block.0.nin_shortcut.weight" in state  # diffusers' last up block is LDM level 0
    vae.save_config(tmp_path)
    loaded = AutoencoderKL.from_single_file(state, config=str(tmp_path), local_files_only=True)
    for key, tensor in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_vae_conversion_rejects_unknown_modules() -> None:
    with pytest.raises(KeyError, match="VAE module 'encoder.extra_layer' has no LDM name"):
        ldm_convert.vae_to_ldm({"encoder.extra_layer.weight": torch.zeros(1)}, {"up_block_types": ["UpDecoderBlock2D"]})


def test_sdxl_second_encoder_is_open_clip_layout(exported: dict, reference: dict) -> None:
    state = load_file(exported["tiny-sdxl"][1])
    encoder = reference["tiny-sdxl"]["text_encoder_2"]
    attention = encoder.text_model.encoder.layers[0].self_attn
    prefix = "conditioner.embedders.1.model."
    fused = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(state[prefix + "transformer.resblocks.0.attn.in_proj_weight"], fused)
    assert torch.equal(state[prefix + "text_projection"], encoder.text_projection.weight.T)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in state


def test_sdxl_second_encoder_matches_diffusers_converter(exported: dict, reference: dict) -> None:
    """An independent reader of the OpenCLIP layout (diffusers' own) gets back the original weights."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    encoder = reference["tiny-sdxl"]["text_encoder_2"]
    state = load_file(exported["tiny-sdxl"][1])
    converted = convert_open_clip_checkpoint(encoder, state, prefix=ldm_convert.SDXL_TEXT_ENCODER_2_PREFIX)
    original = encoder.state_dict()
    assert converted.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(converted[key], tensor), key


def test_sd1_single_file_matches_diffusers_pipeline_loader(exported: dict, reference: dict) -> None:
    """diffusers' whole-pipeline single-file loader reads our export (text encoder included) unchanged."""
    from diffusers import StableDiffusionPipeline

    folder, single = exported["tiny-sd1"]
    pipeline = StableDiffusionPipeline.from_single_file(
        str(single), config=str(folder), local_files_only=True, safety_checker=None, feature_extractor=None
    )
    for name in ("unet", "vae", "text_encoder"):
        original = reference["tiny-sd1"][name].state_dict()
        loaded = getattr(pipeline, name).state_dict()
        for key, tensor in original.items():
            assert torch.equal(loaded[key], tensor), f"{name}.{key}"


@pytest.fixture(scope="module")
def plain_single_file(tmp_path_factory: pytest.TempPathFactory, reference: dict) -> Path:
    """A tiny-sd1 single file without the embedded-config metadata, like a real checkpoint."""
    path = tmp_path_factory.mktemp("plain") / "model.safetensors"
    ldm_convert.save_single_file(ldm_convert.components_to_single_file(reference["tiny-sd1"]), path)
    return path


def test_single_file_of_an_unknown_size_names_the_override(plain_single_file: Path) -> None:
    """A tiny model has SD 1.x's layout but not its sizes: no built-in config fits, so the user is sent to
    --pretrained_model_config."""
    with pytest.raises(ValueError, match=r"model\.safetensors has the layout of an SD 1\.x checkpoint but .*"
                       r"tensors of other shapes .*pass --pretrained_model_config DIR"):
        models.load_models(make_args(plain_single_file))


def test_single_file_with_explicit_config(plain_single_file: Path, exported: dict, reference_outputs: dict) -> None:
    folder, _ = exported["tiny-sd1"]
    bundle = models.load_models(make_args(plain_single_file, pretrained_model_config=str(folder)))
    assert_same_outputs(bundle, reference_outputs["tiny-sd1"], atol=1e-5)


def test_single_file_with_sibling_config(
    tmp_path: Path, plain_single_file: Path, reference: dict, reference_outputs: dict
) -> None:
    single = tmp_path / "mine.safetensors"
    single.write_bytes(plain_single_file.read_bytes())
    models.save_diffusers_folder(reference["tiny-sd1"], tmp_path / "mine")
    bundle = models.load_models(make_args(single))
    assert_same_outputs(bundle, reference_outputs["tiny-sd1"], atol=1e-5)


def test_ckpt_with_state_dict_wrapper(
    tmp_path: Path, plain_single_file: Path, exported: dict, reference_outputs: dict
) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(plain_single_file)}, path)
    bundle = models.load_models(make_args(path, pretrained_model_config=str(exported["tiny-sd1"][0])))
    assert_same_outputs(bundle, reference_outputs["tiny-sd1"], atol=1e-5)


def test_single_file_with_wrong_family_config(plain_single_file: Path, exported: dict) -> None:
    args = make_args(plain_single_file, pretrained_model_config=str(exported["tiny-sdxl"][0]))
    with pytest.raises(ValueError, match=r"model\.safetensors: U-Net/VAE do not fit the configs in .*tiny-sdxl"):
        models.load_models(args, sdxl=True)


# --- --vae ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vae() -> AutoencoderKL:
    return tiny_models.build_tiny("tiny-sd1", seed=7)["vae"]


def assert_vae_weights(vae: AutoencoderKL, expected: AutoencoderKL) -> None:
    loaded = vae.state_dict()
    for key, tensor in expected.state_dict().items():
        assert torch.equal(loaded[key], tensor), key


def test_vae_override_from_folder(tmp_path: Path, other_vae: AutoencoderKL) -> None:
    other_vae.save_pretrained(tmp_path / "vae")
    bundle = models.load_models(make_args("tiny-sd1", vae=str(tmp_path / "vae")))
    assert_vae_weights(bundle.vae, other_vae)


def test_vae_override_from_single_file(tmp_path: Path, other_vae: AutoencoderKL, reference: dict) -> None:
    # a standalone VAE file: LDM names without the first_stage_model. prefix
    path = tmp_path / "vae.safetensors"
    ldm_convert.save_single_file(ldm_convert.vae_to_ldm(other_vae.state_dict(), other_vae.config), path)
    bundle = models.load_models(make_args("tiny-sd1", vae=str(path)))
    assert_vae_weights(bundle.vae, other_vae)
    assert bundle.vae.config.scaling_factor == reference["tiny-sd1"]["vae"].config.scaling_factor
    assert not torch.equal(bundle.vae.encoder.conv_in.weight, reference["tiny-sd1"]["vae"].encoder.conv_in.weight)


def test_vae_override_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--vae .*no such file or folder"):
        models.load_models(make_args("tiny-sd1", vae=str(tmp_path / "absent.safetensors")))


# --- errors -----------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model not found: .*expected a diffusers folder, a .safetensors/.ckpt"):
        models.load_models(make_args(tmp_path / "nothing" / "here"))


def test_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no model_index.json in {tmp_path}"):
        models.load_models(make_args(tmp_path))


def test_hub_id_is_not_downloaded() -> None:
    with pytest.raises(FileNotFoundError, match="never downloads models. Download it first"):
        models.load_models(make_args("no-such-owner/no-such-model"))


def test_unknown_file_type(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="weights.txt is not a model file"):
        models.load_models(make_args(path))


def test_missing_component_folder(tmp_path: Path, exported: dict) -> None:
    (tmp_path / "model_index.json").write_text((exported["tiny-sd1"][0] / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match="has no unet/ folder"):
        models.load_models(make_args(tmp_path))


def test_a_real_path_named_like_an_embedded_model_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny-sd1").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model_index.json in tiny-sd1"):
        models.load_models(make_args("tiny-sd1"))


def test_make_tiny_model_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already exists and is not an empty folder"):
        make_tiny_model("sd1", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
