"""Single files without configs: recognising SD 1.x / SD 2.x / SDXL base, the published layouts at full size
(on the meta device and in header-only sparse files), loading with the built-in configs, and the files refused.

Full-size weights are never written: a full-size layout is the single-file naming of modules built on the meta
device, checked against names and shapes of the released checkpoints and against diffusers' own converters.
The loading path itself is run on tiny models, with the architecture table swapped for their configs.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from library import clip_tokenizer, ldm_convert, models, single_file, tiny_models
from library.errors import UserInputError


def _refuse_connection(*args: Any, **kwargs: Any) -> None:
    raise OSError("network access attempted during a single-file test")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse_connection)
    monkeypatch.setattr(socket, "create_connection", _refuse_connection)


# Names and shapes of tensors in the released files (v1-5-pruned-emaonly, v2-1_768-ema-pruned, sd_xl_base_1.0).
RELEASED = {
    "sd1": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.output_blocks.9.1.transformer_blocks.0.attn2.to_v.weight": (320, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.0.1.proj_in.weight": (1280, 1280),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    },
}
# Tensors the released files carry beyond what training needs (SD 2.x's 24th text layer, which it skips; EMA
# copies; logit scales; transformers' position ids); recognition must ignore them.
RELEASED_EXTRAS = {
    "sd1": {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
        "model_ema.decay": (),
        "model_ema.num_updates": (),
    },
    "sd2": {
        **{f"cond_stage_model.model.transformer.resblocks.23.{name}": shape for name, shape in (
            ("attn.in_proj_weight", (3072, 1024)), ("attn.in_proj_bias", (3072,)),
            ("attn.out_proj.weight", (1024, 1024)), ("attn.out_proj.bias", (1024,)),
            ("ln_1.weight", (1024,)), ("ln_1.bias", (1024,)), ("ln_2.weight", (1024,)), ("ln_2.bias", (1024,)),
            ("mlp.c_fc.weight", (4096, 1024)), ("mlp.c_fc.bias", (4096,)),
            ("mlp.c_proj.weight", (1024, 4096)), ("mlp.c_proj.bias", (1024,)),
        )},
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.logit_scale": (),
    },
    "sdxl": {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
        "conditioner.embedders.1.model.logit_scale": (),
    },
}
# U-Net parameters of the released models (diffusers' counts).
UNET_PARAMETERS = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}


def released_layout(key: str) -> dict[str, tuple[int, ...]]:
    return single_file.expected_shapes(single_file.ARCHITECTURES[key]) | RELEASED_EXTRAS[key]


@pytest.mark.parametrize("key", ["sd1", "sd2", "sdxl"])
def test_full_size_layout_has_the_released_names_and_shapes(key: str) -> None:
    layout = single_file.expected_shapes(single_file.ARCHITECTURES[key])
    for name, shape in RELEASED[key].items():
        assert layout[name] == shape, name
    unet = sum(torch.Size(shape).numel() for name, shape in layout.items() if name.startswith("model.diffusion_model."))
    assert unet == UNET_PARAMETERS[key]
    assert single_file.identify(released_layout(key), "model.safetensors") is single_file.ARCHITECTURES[key]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["sd1", "sd2", "sdxl"])
def test_full_size_layout_is_what_diffusers_converters_read(key: str) -> None:
    """diffusers' own LDM → diffusers converters (which the loader uses) turn the expected layout into exactly
    the U-Net and VAE of the built-in configs; our OpenCLIP/CLIP readers give the text encoders' tensors."""
    arch = single_file.ARCHITECTURES[key]
    state = {name: torch.empty(shape, device="meta") for name, shape in released_layout(key).items()}
    with torch.device("meta"):
        parts = single_file.build_components(arch)
    for name, converted in (
        ("unet", convert_ldm_unet_checkpoint(state, dict(arch.unet))),
        ("vae", convert_ldm_vae_checkpoint(state, dict(arch.vae))),
    ):
        wanted = {k: tuple(v.shape) for k, v in parts[name].state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == wanted, name
    prefixes = {"sd1": [ldm_convert.SD1_TEXT_ENCODER_PREFIX], "sd2": [ldm_convert.SD2_TEXT_ENCODER_PREFIX]}
    prefixes["sdxl"] = [ldm_convert.SDXL_TEXT_ENCODER_1_PREFIX, ldm_convert.SDXL_TEXT_ENCODER_2_PREFIX]
    for (name, _), prefix in zip(arch.text_encoders, prefixes[key]):
        selected = ldm_convert.select_prefixed(state, prefix)
        open_clip = prefix != ldm_convert.SD1_TEXT_ENCODER_PREFIX and prefix != ldm_convert.SDXL_TEXT_ENCODER_1_PREFIX
        text = ldm_convert.open_clip_text_from_ldm(selected) if open_clip else ldm_convert.clip_text_from_ldm(selected)
        for k, v in parts[name].state_dict().items():
            assert tuple(text[k if k in text else f"text_model.{k}"].shape) == tuple(v.shape), f"{name}.{k}"


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A .safetensors file with a real header and all-zero fp16 data, written sparse (a few kB on disk)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)


@pytest.mark.parametrize("key", ["sd1", "sd2", "sdxl"])
def test_full_size_file_is_recognised_from_its_header(tmp_path: Path, key: str) -> None:
    path = tmp_path / f"{key}.safetensors"
    write_header_only(path, released_layout(key))
    assert path.stat().st_size > 1_500_000_000  # the size of a real fp16 checkpoint, though nothing was written
    shapes = single_file.read_safetensors_shapes(path)
    assert shapes == released_layout(key)
    assert single_file.identify(shapes, path).key == key


def test_sd2_file_with_convolutional_projections() -> None:
    layout = released_layout("sd2")
    layout = {k: (v + (1, 1) if k.endswith((".proj_in.weight", ".proj_out.weight")) else v) for k, v in layout.items()}
    arch = single_file.identify(layout, "v2.safetensors")
    assert arch.key == "sd2" and arch.unet["use_linear_projection"] is False


# --- refused files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "is a LoRA / LyCORIS network"),
        ({"diffusion_model.input_blocks.0.0.lora_A.weight": (4, 320)}, "is a LoRA / LyCORIS network"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "is a FLUX checkpoint"),
        ({"conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}, "SDXL refiner"),
        ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "one component in the diffusers layout"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "none of their text encoders"),
        ({}, "holds no tensors"),
    ],
)
def test_other_kinds_of_file_are_named(shapes: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=rf"^other\.safetensors .*{message}"):
        single_file.identify(shapes, "other.safetensors")


def test_inpainting_variant_names_the_tensor() -> None:
    layout = released_layout("sd1") | {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    wrong_input = r"input_blocks\.0\.0\.weight is \(320, 9, 3, 3\), expected \(320, 4, 3, 3\)"
    with pytest.raises(UserInputError, match=wrong_input):
        single_file.identify(layout, "inpaint.safetensors")


def test_missing_component_is_named() -> None:
    layout = {k: v for k, v in released_layout("sdxl").items() if not k.startswith("first_stage_model.")}
    with pytest.raises(UserInputError, match=r"SDXL base checkpoint but lacks 248 of the 2513 .*first_stage_model\."):
        single_file.identify(layout, "novae.safetensors")


def test_truncated_and_damaged_files(tmp_path: Path) -> None:
    path = tmp_path / "sd15.safetensors"
    write_header_only(path, released_layout("sd1"))
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(UserInputError, match=r"sd15\.safetensors is truncated: its header lists \d+ bytes"):
        single_file.read_safetensors_shapes(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(UserInputError, match=r"sd15\.safetensors is not a readable \.safetensors file: its header"):
        single_file.read_safetensors_shapes(path)
    path.write_bytes(b"PK\x03\x04 a zip, say")
    with pytest.raises(UserInputError, match=r"header claims \d+ bytes and the file has 15;"):
        single_file.read_safetensors_shapes(path)


@pytest.mark.slow
def test_a_lora_file_given_as_the_model_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Through the entry point: `error: <file> is a LoRA ...`, exit status 2, before any weight is loaded."""
    import train_network

    lora = tmp_path / "my_lora.safetensors"
    ldm_convert.save_single_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    data = Path(__file__).resolve().parent.parent / "data" / "demo" / "train"
    argv = ["--pretrained_model_name_or_path", str(lora), "--train_data_dir", str(data), "--output_dir",
            str(tmp_path / "out"), "--max_train_steps", "1", "--resolution", "64"]
    with pytest.raises(SystemExit) as stopped:
        train_network.main(argv)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {lora} is a LoRA / LyCORIS network file, not a base model")
    assert "Traceback" not in "\n".join(lines)


# --- loading with the built-in configs (tiny stand-ins) ---------------------------------------------------------


def _init_args(config: Any) -> dict[str, Any]:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def _text_config(model: Any) -> dict[str, Any]:
    return {k: v for k, v in model.config.to_dict().items() if k not in ("architectures", "transformers_version")}


def _tiny_sd2_parts() -> dict[str, Any]:
    """tiny-sd1 with an OpenCLIP-style (gelu) text encoder: SD 2.x's layout at toy size."""
    parts = tiny_models.build_tiny(tiny_models.TINY_SD1, models.EMBEDDED_MODEL_SEED)
    torch.manual_seed(3)
    config = CLIPTextConfig(**_text_config(parts["text_encoder"]) | {"hidden_act": "gelu"})
    parts["text_encoder"] = CLIPTextModel(config)
    return parts


@pytest.fixture()
def tiny_table(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """The architecture table with tiny configs in place of the published ones; returns the tiny components."""
    built = {
        "sd1": tiny_models.build_tiny(tiny_models.TINY_SD1, models.EMBEDDED_MODEL_SEED),
        "sd2": _tiny_sd2_parts(),
        "sdxl": tiny_models.build_tiny(tiny_models.TINY_SDXL, models.EMBEDDED_MODEL_SEED),
    }
    table = {}
    for key, parts in built.items():
        published = single_file.ARCHITECTURES[key]
        text = tuple((name, _text_config(parts[name])) for name, _ in published.text_encoders)
        table[key] = single_file.Architecture(
            key, published.label, _init_args(parts["unet"].config), _init_args(parts["vae"].config), text,
            published.tokenizers,
        )
    monkeypatch.setattr(single_file, "ARCHITECTURES", table)
    return built


def assert_same_weights(bundle: models.ModelBundle, parts: dict[str, Any]) -> None:
    loaded = {"unet": bundle.unet, "vae": bundle.vae, "text_encoder": bundle.text_encoders[0]}
    if bundle.is_sdxl:
        loaded["text_encoder_2"] = bundle.text_encoders[1]
    for name, module in loaded.items():
        expected = parts[name].state_dict()
        actual = module.state_dict()
        assert actual.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), f"{name}.{key}"


@pytest.mark.slow
@pytest.mark.parametrize("key, suffix", [("sd1", ".safetensors"), ("sd1", ".ckpt"), ("sd2", ".safetensors"),
                                         ("sdxl", ".safetensors")])
def test_single_file_loads_with_built_in_configs(tmp_path: Path, tiny_table: dict, key: str, suffix: str) -> None:
    parts = tiny_table[key]
    path = tmp_path / f"model{suffix}"
    state = ldm_convert.components_to_single_file(parts, sd2=key == "sd2")
    if suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 10}, path)
    else:
        ldm_convert.save_single_file(state, path)
    args = Namespace(pretrained_model_name_or_path=str(path))
    bundle = models.load_models(args, sdxl=key == "sdxl")
    assert_same_weights(bundle, parts)
    assert (bundle.v2, bundle.model_version) == {
        "sd1": (False, models.MODEL_VERSION_SD1), "sd2": (True, models.MODEL_VERSION_SD2),
        "sdxl": (False, models.MODEL_VERSION_SDXL),
    }[key]
    pads = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[key]
    assert [tokenizer.pad_token for tokenizer in bundle.tokenizers] == pads
    for tokenizer in bundle.tokenizers:
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert len(tokenizer) == clip_tokenizer.VOCAB_SIZE


def test_config_override_still_wins(tmp_path: Path, tiny_table: dict) -> None:
    """--pretrained_model_config: the folder's configs and its own tokenizer, not the built-in ones."""
    parts = tiny_table["sd1"]
    path = tmp_path / "model.safetensors"
    ldm_convert.save_single_file(ldm_convert.components_to_single_file(parts), path)
    models.save_diffusers_folder(parts, tmp_path / "configs")
    bundle = models.load_models(Namespace(pretrained_model_name_or_path=str(path),
                                          pretrained_model_config=str(tmp_path / "configs")))
    assert_same_weights(bundle, parts)
    assert len(bundle.tokenizers[0]) == len(parts["tokenizer"]) < clip_tokenizer.VOCAB_SIZE


def test_safetensors_header_shapes_match_the_tensors(tmp_path: Path, tiny_table: dict) -> None:
    path = tmp_path / "model.safetensors"
    ldm_convert.save_single_file(ldm_convert.components_to_single_file(tiny_table["sdxl"]), path)
    assert single_file.read_safetensors_shapes(path) == single_file.shapes_of(load_file(path))


def test_diffusers_folder_without_tokenizer_gets_the_built_in_one(tmp_path: Path) -> None:
    parts = tiny_models.build_tiny(tiny_models.TINY_SDXL, models.EMBEDDED_MODEL_SEED)
    models.save_diffusers_folder(parts, tmp_path / "model")
    kept = CLIPTokenizer.from_pretrained(tmp_path / "model", subfolder="tokenizer", local_files_only=True)
    shutil.rmtree(tmp_path / "model" / "tokenizer_2")
    bundle = models.load_models(Namespace(pretrained_model_name_or_path=str(tmp_path / "model")), sdxl=True)
    assert bundle.tokenizers[0].get_vocab() == kept.get_vocab()  # the folder's own tokenizer wins where it has one
    assert len(bundle.tokenizers[1]) == clip_tokenizer.VOCAB_SIZE and bundle.tokenizers[1].pad_token_id == 0


def test_inferred_sd2_is_written_as_v2_in_the_metadata() -> None:
    """An SD 2.x file loaded without --v2 is treated as v2 (library.models); ss_v2 says so, as with --v2."""
    from library import config, metadata

    args = config.parse_args(["--pretrained_model_name_or_path", "sd2.safetensors", "--train_data_dir", "d",
                              "--output_dir", "o"], sdxl=False)
    common = dict(session_id=0, training_started_at=0.0, text_encoder_lr=None, optimizer="ANLO", num_train_images=1,
                  num_reg_images=0, num_batches_per_epoch=1, num_epochs=1, network_kwargs={})
    assert metadata.training_metadata(args, model_version=models.MODEL_VERSION_SD2, **common)["ss_v2"] == "True"
    assert metadata.training_metadata(args, model_version=models.MODEL_VERSION_SD1, **common)["ss_v2"] == "False"


# --- loading in the training dtype ----------------------------------------------------------------------------


def _components(bundle: models.ModelBundle) -> dict[str, torch.nn.Module]:
    loaded = {"unet": bundle.unet, "vae": bundle.vae, "text_encoder": bundle.text_encoders[0]}
    if bundle.is_sdxl:
        loaded["text_encoder_2"] = bundle.text_encoders[1]
    return loaded


@pytest.mark.slow
@pytest.mark.parametrize("key, suffix, file_dtype, mixed_precision, no_half_vae", [
    ("sd1", ".safetensors", torch.float16, "bf16", False),
    ("sd1", ".ckpt", torch.float32, "fp16", True),
    ("sd2", ".safetensors", torch.float32, "bf16", False),
    ("sdxl", ".safetensors", torch.float16, "bf16", True),
    ("sdxl", ".safetensors", torch.float32, "fp16", False),
])
def test_single_file_loads_in_the_training_dtype_bit_for_bit(
    tmp_path: Path, tiny_table: dict, key: str, suffix: str, file_dtype: torch.dtype, mixed_precision: str,
    no_half_vae: bool,
) -> None:
    """Loaded directly in the trainer's dtypes: the same tensors as loading in fp32, then casting as the trainer
    does (U-Net and text encoders to the mixed-precision dtype, the VAE too unless --no_half_vae)."""
    state = ldm_convert.components_to_single_file(tiny_table[key], sd2=key == "sd2")
    state = {name: tensor.to(file_dtype) for name, tensor in state.items()}
    path = tmp_path / f"model{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        ldm_convert.save_single_file(state, path)
    sdxl = key == "sdxl"
    direct = models.load_models(Namespace(pretrained_model_name_or_path=str(path), mixed_precision=mixed_precision,
                                          no_half_vae=no_half_vae), sdxl=sdxl)
    reference = models.load_models(Namespace(pretrained_model_name_or_path=str(path)), sdxl=sdxl)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    for name, module in _components(reference).items():
        expected_dtype = torch.float32 if name == "vae" and no_half_vae else half
        assert {p.dtype for p in module.parameters()} == {torch.float32}, name  # the reference loads in fp32
        module.to(expected_dtype)
        expected, actual = module.state_dict(), _components(direct)[name].state_dict()
        assert actual.keys() == expected.keys(), name
        for tensor_name, tensor in expected.items():
            assert actual[tensor_name].dtype == tensor.dtype, f"{name}.{tensor_name}"
            assert torch.equal(actual[tensor_name], tensor), f"{name}.{tensor_name}"
        assert {p.dtype for p in _components(direct)[name].parameters()} == {expected_dtype}, name


def test_frozen_dtypes_follow_the_trainer() -> None:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert models.frozen_dtypes(Namespace(mixed_precision="bf16")) == (bf16, bf16)
    assert models.frozen_dtypes(Namespace(mixed_precision="fp16", no_half_vae=True)) == (fp16, fp32)
    assert models.frozen_dtypes(Namespace(mixed_precision="no")) == (fp32, fp32)
    assert models.frozen_dtypes(Namespace()) == (fp32, fp32)
    # weights used before the trainer casts them stay fp32: --base_weights merges, other packages' networks
    assert models.frozen_dtypes(Namespace(mixed_precision="bf16", base_weights=["b.safetensors"])) == (fp32, bf16)
    assert models.frozen_dtypes(Namespace(mixed_precision="bf16", network_module="lycoris.kohya")) == (fp32, bf16)
    assert models.frozen_dtypes(Namespace(mixed_precision="bf16", network_module="networks.dylora")) == (bf16, bf16)


def test_safetensors_tensors_are_read_as_safetensors_reads_them(tmp_path: Path) -> None:
    """The plain-read loader against safetensors' own, for each dtype a checkpoint holds; cast only floats."""
    tensors = {
        "f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2, 3).bfloat16(),
        "i64": torch.arange(77)[None], "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4),
        "u8": torch.arange(9, dtype=torch.uint8),
    }
    path = tmp_path / "t.safetensors"
    ldm_convert.save_single_file(tensors, path)
    stored = load_file(path)
    read = single_file.read_safetensors_tensors(path, list(tensors), torch.float32)
    assert read.keys() == tensors.keys()
    for name, tensor in stored.items():
        assert read[name].dtype == (torch.float32 if tensor.is_floating_point() else tensor.dtype), name
        assert torch.equal(read[name], tensor.to(read[name].dtype)), name
    half = single_file.read_safetensors_tensors(path, ["f32", "bf16", "i64"], torch.float16)
    assert [t.dtype for t in half.values()] == [torch.float16, torch.float16, torch.int64]
    assert torch.equal(half["f32"], stored["f32"].half())


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "embedded"])
def test_folder_and_embedded_models_load_in_the_training_dtype(tmp_path: Path, source: str) -> None:
    name = tiny_models.TINY_SDXL
    if source == "folder":
        models.save_diffusers_folder(tiny_models.build_tiny(name, models.EMBEDDED_MODEL_SEED), tmp_path / "m")
        name = str(tmp_path / "m")
    direct = models.load_models(Namespace(pretrained_model_name_or_path=name, mixed_precision="bf16",
                                          no_half_vae=True), sdxl=True)
    reference = models.load_models(Namespace(pretrained_model_name_or_path=name), sdxl=True)
    for part, module in _components(reference).items():
        module.to(torch.float32 if part == "vae" else torch.bfloat16)
        actual = _components(direct)[part].state_dict()
        for tensor_name, tensor in module.state_dict().items():
            assert actual[tensor_name].dtype == tensor.dtype and torch.equal(actual[tensor_name], tensor), tensor_name
