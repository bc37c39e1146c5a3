"""library.sai_names and library.lora_format: the diffusers ↔ SAI map, kohya names, files, hashes, ModelSpec."""

from __future__ import annotations

import datetime
import hashlib
import os

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from library import lora_format, sai_names
from library.errors import OutputWriteError
from library.architectures import SD15_UNET, SDXL_UNET
from library.tiny_models import build_tiny



@pytest.fixture(scope="module")
def real_unets() -> dict[str, UNet2DConditionModel]:
    with torch.device("meta"):
        return {"sd15": UNet2DConditionModel(**SD15_UNET), "sdxl": UNet2DConditionModel(**SDXL_UNET)}


# --------------------------------------------------------------------------------------------- sai_names


@pytest.mark.parametrize(
    "model, diffusers_path, sai_path",
    [
        ("sdxl", "down_blocks.1.attentions.0", "input_blocks.4.1"),
        ("sdxl", "mid_block.attentions.0", "middle_block.1"),
        ("sdxl", "up_blocks.0.attentions.0", "output_blocks.0.1"),
        ("sdxl", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", "input_blocks.8.1.transformer_blocks.9.attn2.to_k"),
        ("sdxl", "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("sdxl", "down_blocks.1.downsamplers.0.conv.weight", "input_blocks.6.0.op.weight"),
        ("sdxl", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("sdxl", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("sdxl", "up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
        ("sdxl", "down_blocks.1.resnets.0.norm1.bias", "input_blocks.4.0.in_layers.0.bias"),
        ("sdxl", "mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        ("sdxl", "add_embedding.linear_2", "label_emb.0.2"),
        ("sdxl", "time_embedding.linear_1.weight", "time_embed.0.weight"),
        ("sdxl", "conv_in", "input_blocks.0.0"),
        ("sdxl", "conv_out", "out.2"),
        ("sd15", "down_blocks.0.attentions.1.proj_in", "input_blocks.2.1.proj_in"),
        ("sd15", "down_blocks.3.resnets.1.conv2", "input_blocks.11.0.out_layers.3"),
        ("sd15", "down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
        ("sd15", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        ("sd15", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("sd15", "up_blocks.3.attentions.2", "output_blocks.11.1"),
        ("sd15", "conv_norm_out", "out.0"),
    ],
)
def test_known_real_names_in_both_directions(real_unets, model, diffusers_path, sai_path):
    unet = real_unets[model]
    assert sai_names.convert_module_path(diffusers_path, sai_names.diffusers_to_sai_module_map(unet)) == sai_path
    assert sai_names.convert_module_path(sai_path, sai_names.sai_to_diffusers_module_map(unet)) == diffusers_path


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_every_real_unet_parameter_maps_one_to_one(real_unets, model):
    unet = real_unets[model]
    forward, backward = sai_names.diffusers_to_sai_module_map(unet), sai_names.sai_to_diffusers_module_map(unet)
    keys = list(unet.state_dict())
    converted = [sai_names.convert_module_path(key, forward) for key in keys]
    assert len(set(converted)) == len(keys)
    assert [sai_names.convert_module_path(key, backward) for key in converted] == keys
    # diffusers' own LDM single-file converter takes the SAI names back to the same diffusers keys
    ldm_checkpoint = {f"model.diffusion_model.{key}": None for key in converted}
    assert set(convert_ldm_unet_checkpoint(ldm_checkpoint, dict(unet.config))) == set(keys)


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
def test_tiny_unet_round_trips_through_diffusers_ldm_converter(name):
    unet = build_tiny(name)["unet"]
    module_map = sai_names.diffusers_to_sai_module_map(unet.config)  # a config works as well as the model
    state_dict = unet.state_dict()
    ldm = {f"model.diffusion_model.{sai_names.convert_module_path(k, module_map)}": v for k, v in state_dict.items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state_dict)
    assert all(torch.equal(back[k], v) for k, v in state_dict.items())


def test_per_level_layers_per_block_and_errors():
    config = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=(1, 3))
    mapping = sai_names.diffusers_to_sai_module_map(config)
    # level 0: resnet → input 1, downsampler → 2; level 1: input 3, 4, 5. Up level 0 mirrors level 1: 4 resnets.
    assert mapping["down_blocks.0.downsamplers.0.conv"] == "input_blocks.2.0.op"
    assert mapping["down_blocks.1.attentions.2"] == "input_blocks.5.1"
    assert mapping["up_blocks.0.upsamplers.0.conv"] == "output_blocks.3.2.conv"
    assert mapping["up_blocks.1.resnets.1"] == "output_blocks.5.0"
    with pytest.raises(ValueError, match="lacks 'layers_per_block'"):
        sai_names.diffusers_to_sai_module_map({"down_block_types": (), "up_block_types": ()})
    with pytest.raises(ValueError, match="mid_block_type 'UNetMidBlock2DSimpleCrossAttn' is not supported"):
        sai_names.diffusers_to_sai_module_map({**config, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"})
    with pytest.raises(KeyError, match="'encoder.layers.0' has no SAI/diffusers counterpart"):
        sai_names.convert_module_path("encoder.layers.0", mapping)


# --------------------------------------------------------------------------------------------- kohya names


def test_kohya_names():
    assert lora_format.text_encoder_lora_name("lora_te", "encoder.layers.0.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )
    assert lora_format.text_encoder_lora_name("lora_te2", "text_model.encoder.layers.3.mlp.fc1") == (
        "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    )
    assert lora_format.unet_lora_name("down_blocks.0.attentions.0.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    sdxl_map = sai_names.diffusers_to_sai_module_map(SDXL_UNET)
    assert lora_format.unet_lora_name("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", sdxl_map) == (
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"
    )
    assert lora_format.text_encoder_prefixes(1) == ["lora_te"]
    assert lora_format.text_encoder_prefixes(2) == ["lora_te1", "lora_te2"]
    with pytest.raises(ValueError, match="expected 1 or 2 text encoders, got 3"):
        lora_format.text_encoder_prefixes(3)


def test_sdxl_is_recognised_from_the_unet():
    assert lora_format.is_sdxl_unet(build_tiny("tiny-sdxl")["unet"])
    assert not lora_format.is_sdxl_unet(build_tiny("tiny-sd1")["unet"])


# --------------------------------------------------------------------------------------------- files and hashes


def sample_state_dict(n_elements: int = 64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(4, n_elements, generator=generator),
        "lora_unet_a.lora_up.weight": torch.randn(n_elements, 4, generator=generator).to(torch.bfloat16),
        "lora_unet_a.alpha": torch.tensor(2.0),
    }


def test_safetensors_round_trip_is_bit_exact_with_metadata(tmp_path):
    state_dict = sample_state_dict()
    path = str(tmp_path / "out" / "lora.safetensors")  # the folder is created
    metadata = {"ss_network_dim": "4", "modelspec.title": "x", "ss_tag_frequency": '{"a": {"b": 1}}'}
    written = lora_format.save_lora_file(state_dict, path, metadata)
    loaded, read_metadata = lora_format.load_lora_file(path)
    assert read_metadata == written == {**metadata, "sshs_model_hash": written["sshs_model_hash"],
                                        "sshs_legacy_hash": written["sshs_legacy_hash"]}
    assert set(loaded) == set(state_dict)
    for key, value in state_dict.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
        assert torch.equal(loaded[key], value)
    assert os.listdir(tmp_path / "out") == ["lora.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_torch_format_round_trip(tmp_path, suffix):
    state_dict = sample_state_dict()
    path = str(tmp_path / f"lora{suffix}")
    assert lora_format.save_lora_file(state_dict, path, {"ss_x": "1"}) == {}
    loaded, metadata = lora_format.load_lora_file(path)
    assert metadata == {} and all(torch.equal(loaded[k], v) for k, v in state_dict.items())


def test_model_hash_is_sha256_of_the_data_after_the_header(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    written = lora_format.save_lora_file(sample_state_dict(), path, {"ss_seed": "1", "modelspec.title": "t"})
    with open(path, "rb") as f:
        raw = f.read()
    header_length = int.from_bytes(raw[:8], "little")
    assert written["sshs_model_hash"] == hashlib.sha256(raw[8 + header_length:]).hexdigest()


def test_legacy_hash_reads_one_mib_into_a_file_with_only_ss_metadata(tmp_path):
    state_dict = sample_state_dict(n_elements=100_000)  # > 1 MiB + 64 KiB
    metadata = {"ss_seed": "42", "ss_output_name": "demo", "modelspec.title": "not hashed"}
    reference_path = str(tmp_path / "reference.safetensors")
    safetensors.torch.save_file(state_dict, reference_path, {"ss_seed": "42", "ss_output_name": "demo"})
    with open(reference_path, "rb") as f:
        f.seek(0x100000)
        expected_legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    written = lora_format.save_lora_file(state_dict, str(tmp_path / "lora.safetensors"), metadata)
    assert written["sshs_legacy_hash"] == expected_legacy
    # non-ss keys do not take part; ss keys shift the header and so the legacy hash
    same = lora_format.safetensors_hashes(state_dict, {**metadata, "modelspec.title": "other"})
    shifted = lora_format.safetensors_hashes(state_dict, {**metadata, "ss_output_name": "a much longer name"})
    assert same == (written["sshs_model_hash"], written["sshs_legacy_hash"])
    assert shifted[0] == written["sshs_model_hash"] and shifted[1] != written["sshs_legacy_hash"]


def test_save_rejects_bad_metadata_and_extensions(tmp_path):
    with pytest.raises(TypeError, match=r"lora.safetensors must map strings to strings; .*ss_network_dim"):
        lora_format.save_lora_file(sample_state_dict(), str(tmp_path / "lora.safetensors"), {"ss_network_dim": 4})
    with pytest.raises(ValueError, match=r"lora.bin: expected a .safetensors, .pt or .ckpt extension"):
        lora_format.save_lora_file(sample_state_dict(), str(tmp_path / "lora.bin"))
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = str(tmp_path / "lora.safetensors")
    lora_format.save_lora_file(sample_state_dict(), path, {"ss_a": "old"})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(lora_format.os, "replace", broken_replace)
    with pytest.raises(OutputWriteError, match=rf"could not write {path}: disk full"):
        lora_format.save_lora_file(sample_state_dict(), path, {"ss_a": "new"})
    monkeypatch.undo()
    assert lora_format.load_lora_file(path)[1]["ss_a"] == "old"
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="LoRA file not found: .*missing.safetensors"):
        lora_format.load_lora_file(str(tmp_path / "missing.safetensors"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="cannot read LoRA file .*broken.safetensors"):
        lora_format.load_lora_file(str(broken))
    nested = tmp_path / "nested.pt"
    torch.save({"a": {"b": torch.zeros(1)}}, nested)
    with pytest.raises(ValueError, match="nested.pt does not hold a flat state dict of tensors"):
        lora_format.load_lora_file(str(nested))


# --------------------------------------------------------------------------------------------- ModelSpec


def test_modelspec_metadata_sd1_defaults():
    timestamp = datetime.datetime(2024, 1, 2, 3, 4, 5).timestamp() + 0.75
    metadata = lora_format.modelspec_metadata(sdxl=False, timestamp=timestamp)
    assert metadata == {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"LoRA@{timestamp}",
        "modelspec.date": "2024-01-02T03:04:05",
        "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon",
    }


@pytest.mark.parametrize(
    "kwargs, architecture, implementation, resolution, prediction",
    [
        (dict(sdxl=True), "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models",
         "1024x1024", "epsilon"),
        (dict(sdxl=False, v2=True, v_parameterization=True), "stable-diffusion-v2-768-v/lora", "diffusers",
         "768x768", "v"),
        (dict(sdxl=False, v2=True, resolution="640,512"), "stable-diffusion-v2-512/lora", "diffusers",
         "640x512", "epsilon"),
        (dict(sdxl=True, resolution=(896, 1152)), "stable-diffusion-xl-v1-base/lora",
         "https://github.com/Stability-AI/generative-models", "896x1152", "epsilon"),
    ],
)
def test_modelspec_metadata_variants(kwargs, architecture, implementation, resolution, prediction):
    metadata = lora_format.modelspec_metadata(timestamp=0.0, title="mine", author="me", clip_skip=2, **kwargs)
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.implementation"] == implementation
    assert metadata["modelspec.resolution"] == resolution
    assert metadata["modelspec.prediction_type"] == prediction
    assert metadata["modelspec.title"] == "mine" and metadata["modelspec.author"] == "me"
    assert metadata["modelspec.encoder_layer"] == "2"
    assert "modelspec.license" not in metadata
    assert all(isinstance(v, str) for v in metadata.values())
