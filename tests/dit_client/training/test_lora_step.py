"""One FLUX.2 LoRA training step fed from the embedding store, with no text encoder anywhere in the loop.

Mirrors the step of diffusers' examples/dreambooth/train_dreambooth_lora_flux2.py
(flow-matching loss on packed latents, prompt_embeds + text_ids as the text
input) at toy size on the CPU; docs/training.md shows the same loop.
"""

from __future__ import annotations

import pytest
import torch

from dit_client.remote import RemoteTextEncoder
from dit_client.training import EmbeddingDataset, precompute

CAPTIONS = ["a photo of sks dog", "a photo of sks dog on a beach"]


@pytest.fixture()
def no_text_encoder(monkeypatch):
    """Any attempt to build the Mistral-3 text encoder fails the test."""
    from transformers import Mistral3ForConditionalGeneration

    def refuse(*args, **kwargs):
        raise AssertionError("the training step tried to load the text encoder")

    monkeypatch.setattr(Mistral3ForConditionalGeneration, "from_pretrained", refuse)
    monkeypatch.setattr(Mistral3ForConditionalGeneration, "__init__", refuse)


def training_step(transformer, vae, optimizer, batch, pixel_values, generator) -> torch.Tensor:
    """One flow-matching step, as the diffusers FLUX.2 LoRA script takes it; returns the loss."""
    from diffusers import Flux2Pipeline

    # 1. Image -> normalised, patchified latents.
    with torch.no_grad():
        latents = vae.encode(pixel_values).latent_dist.mode()
        latents = Flux2Pipeline._patchify_latents(latents)
        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
        bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        model_input = (latents - bn_mean) / bn_std
    latent_ids = Flux2Pipeline._prepare_latent_ids(model_input)

    # 2. Noise at a random sigma (flow matching: z_t = (1 - t) x + t noise).
    bsz = model_input.shape[0]
    noise = torch.randn(model_input.shape, generator=generator)
    sigmas = torch.rand((bsz,), generator=generator).clamp(0.05, 0.95)
    noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * model_input + sigmas.view(-1, 1, 1, 1) * noise
    packed = Flux2Pipeline._pack_latents(noisy)  # [B, H*W, C]

    # 3. The text side comes from the store: prompt_embeds [B, 512, D], text_ids [B, 512, 4].
    pred = transformer(
        hidden_states=packed,
        timestep=sigmas,
        guidance=torch.full((bsz,), 1.0),
        encoder_hidden_states=batch["prompt_embeds"].to(torch.float32),
        txt_ids=batch["text_ids"],
        img_ids=latent_ids,
        return_dict=False,
    )[0]
    pred = Flux2Pipeline._unpack_latents_with_ids(pred[:, : packed.size(1)], latent_ids)
    loss = torch.mean((pred.float() - (noise - model_input).float()) ** 2)

    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def test_one_lora_step_from_the_store(server, tiny_model_dir, tmp_path, no_text_encoder):
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from peft import LoraConfig

    # Captions encoded once by the service (the store is all the training loop sees).
    with RemoteTextEncoder(server.target) as enc:
        precompute(enc, CAPTIONS, tmp_path / "embeds", progress=False)

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel.from_pretrained(tiny_model_dir / "transformer", torch_dtype=torch.float32)
    vae = AutoencoderKLFlux2.from_pretrained(tiny_model_dir / "vae", torch_dtype=torch.float32)
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    lora = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    base = {n: p.detach().clone() for n, p in transformer.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-3)

    loader = torch.utils.data.DataLoader(EmbeddingDataset(tmp_path / "embeds", captions=CAPTIONS), batch_size=2)
    batch = next(iter(loader))
    assert batch["prompt_embeds"].shape == (2, 512, transformer.config.joint_attention_dim)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.rand((2, 3, 16, 16), generator=generator) * 2 - 1

    transformer.train()
    loss = training_step(transformer, vae, optimizer, batch, pixel_values, generator)

    assert torch.isfinite(loss) and loss.item() > 0
    changed = [n for n, p in lora.items() if not torch.equal(p.detach(), before[n])]
    lora_b = [n for n in lora if "lora_B" in n]
    assert set(lora_b) <= set(changed), "every LoRA B matrix should move on the first step"
    for n, p in transformer.named_parameters():
        if n in base:
            assert torch.equal(p.detach(), base[n]), f"base weight {n} changed"
