"""Our LoRA files load into diffusers pipelines (``load_lora_weights``) and give the same outputs as our network.

diffusers converts kohya files itself (SD names, SDXL's SAI names, ``text_model_`` text-encoder keys), so agreement
here checks our key names, alphas and shapes against an independent reader. Needs ``peft`` (diffusers' LoRA backend).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from library.tiny_models import build_tiny
from networks.lora import create_network

pytest.importorskip("peft", reason="diffusers' load_lora_weights needs the peft package")

TOKENS = torch.tensor([[0, 5, 17, 42, 99, 1, 1]])


def build_pipeline(name: str):
    parts = build_tiny(name, seed=0)
    common = dict(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                  unet=parts["unet"], scheduler=parts["scheduler"])
    if name == "tiny-sdxl":
        return StableDiffusionXLPipeline(text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"],
                                         **common)
    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                   **common)


def encoders_of(pipe) -> list[torch.nn.Module]:
    return [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]


def outputs(pipe) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """U-Net prediction and text-encoder hidden states for fixed inputs."""
    generator = torch.Generator().manual_seed(1)
    unet = pipe.unet
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)}
    with torch.no_grad():
        sample = unet(torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 700]),
                      torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator), **kwargs).sample
        hidden = [e(TOKENS).last_hidden_state for e in encoders_of(pipe)]
    return sample, hidden


@pytest.mark.parametrize(
    "name, network_args",
    [("tiny-sd1", {"conv_dim": "3", "conv_alpha": "2"}), ("tiny-sdxl", {"conv_dim": "2"})],  # attention + conv keys
)
def test_diffusers_loads_our_file_with_identical_outputs(tmp_path, name, network_args):
    ours = build_pipeline(name)
    base_sample, base_hidden = outputs(ours)
    encoders = encoders_of(ours)
    network = create_network(1.0, 4, 2.0, None, encoders if len(encoders) > 1 else encoders[0], ours.unet,
                             **network_args)
    network.apply_to(encoders, ours.unet)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param_name, param in network.named_parameters():
            if "lora_up" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "networks.lora"})
    our_sample, our_hidden = outputs(ours)

    theirs = build_pipeline(name)
    theirs.load_lora_weights(str(path))
    their_sample, their_hidden = outputs(theirs)

    assert not torch.allclose(our_sample, base_sample, atol=1e-3)  # the LoRA does change the outputs
    torch.testing.assert_close(their_sample, our_sample, rtol=0, atol=1e-4)
    for ours_h, theirs_h, base_h in zip(our_hidden, their_hidden, base_hidden):
        assert not torch.allclose(ours_h, base_h, atol=1e-3)
        torch.testing.assert_close(theirs_h, ours_h, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("module_name, network_args", [("networks.lora_fa", {"conv_dim": "2"}),
                                                       ("networks.dylora", {"conv_dim": "4", "unit": "2"})])
def test_diffusers_loads_lora_fa_and_dylora_files(tmp_path, module_name, network_args):
    """Both write kohya LoRA files: diffusers reads them and gives our network's (eval-mode) outputs."""
    ours = build_pipeline("tiny-sd1")
    network = importlib.import_module(module_name).create_network(
        1.0, 4, 2.0, None, ours.text_encoder, ours.unet, **network_args
    )
    network.apply_to(ours.text_encoder, ours.unet)
    network.eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param_name, param in network.named_parameters():
            if "lora_up" in param_name or ".lora_B." in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": module_name})
    our_sample, our_hidden = outputs(ours)

    theirs = build_pipeline("tiny-sd1")
    theirs.load_lora_weights(str(path))
    their_sample, their_hidden = outputs(theirs)
    torch.testing.assert_close(their_sample, our_sample, rtol=0, atol=1e-4)
    torch.testing.assert_close(their_hidden[0], our_hidden[0], rtol=0, atol=1e-4)
    assert not torch.allclose(our_sample, outputs(build_pipeline("tiny-sd1"))[0], atol=1e-3)
