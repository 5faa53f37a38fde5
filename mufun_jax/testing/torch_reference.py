"""PyTorch reference for the parity tests and the benchmarks: HF transformers modules composed
exactly the way the MuFun/TinyLLaVA code composes them.

It lives in the package (not in tests/) so that tests/ and bench/ both import it as
``mufun_jax.testing.torch_reference`` without editing ``sys.path``. It imports torch at module
level on purpose: only tests and benchmarks import this module (torch is a test extra), and no
other module of the package imports it, so the package itself never needs torch."""

from __future__ import annotations

import math

import numpy as np
import torch
import transformers
from torch import nn

from flax import nnx

from mufun_jax.config import IMAGE_TOKEN_INDEX, MuFunConfig, Qwen3Config, WhisperConfig, parse_connector_type
from mufun_jax.convert import load_params, torch_to_flax
from mufun_jax.models import MuFun


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights of a useful scale (norm weights near 1, fan-in scaled matrices,
    non-zero biases), so that every parameter matters for the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.ndim >= 2 and "embed" not in name:
                fan_in = math.prod(p.shape[1:])
                p.copy_(r / math.sqrt(fan_in))
            else:  # embedding tables, positional table
                p.copy_(0.5 * r)
    return module


def hf_whisper_config(cfg: WhisperConfig) -> transformers.WhisperConfig:
    return transformers.WhisperConfig(
        num_mel_bins=cfg.num_mel_bins, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
        encoder_attention_heads=cfg.encoder_attention_heads, encoder_ffn_dim=cfg.encoder_ffn_dim,
        max_source_positions=cfg.max_source_positions, decoder_layers=1, decoder_attention_heads=cfg.encoder_attention_heads,
        decoder_ffn_dim=cfg.encoder_ffn_dim, attn_implementation="eager",
    )


def hf_whisper_encoder(cfg: WhisperConfig, seed: int = 0) -> nn.Module:
    enc = transformers.models.whisper.modeling_whisper.WhisperEncoder(hf_whisper_config(cfg))
    return randomize_(enc, seed).eval()


def hf_qwen3(cfg: Qwen3Config, seed: int = 0) -> nn.Module:
    d = cfg.to_hf()
    d.pop("architectures")
    d.pop("model_type")
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**d, attn_implementation="eager"))
    randomize_(model, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


class TorchConnector(nn.Module):
    """TinyLLaVA connector wrapper: the projector lives at ``_connector`` (the released key names)."""

    def __init__(self, connector_type: str, in_dim: int, out_dim: int):
        super().__init__()
        kind, mult = parse_connector_type(connector_type)
        if kind == "blp":
            self._connector = nn.Module()
            self._connector.linear1 = nn.Linear(in_dim, mult * in_dim)
            self._connector.act = nn.GELU()
            self._connector.linear2 = nn.Linear(mult * in_dim, out_dim)
        elif kind == "mlp":
            self._connector = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            self._connector = nn.Linear(in_dim, out_dim)
        self.kind = kind

    def forward(self, x):
        if self.kind == "blp":
            c = self._connector
            return c.linear2(c.act(c.linear1(x)))
        return self._connector(x)


class TorchMuFun(nn.Module):
    """encode each chunk -> concat taps -> AvgPool1d(stride) -> connector -> splice at -200 -> Qwen3."""

    def __init__(self, cfg: MuFunConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = nn.Module()
        self.vision_tower._vision_tower = hf_whisper_encoder(cfg.whisper, seed)
        self.connector = randomize_(TorchConnector(cfg.connector_type, cfg.audio_feature_dim, cfg.qwen3.hidden_size),
                                    seed + 1)
        self.language_model = hf_qwen3(cfg.qwen3, seed + 2)
        self.eval()

    def audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower._vision_tower(mel, output_hidden_states=True)
        feats = torch.cat([out.hidden_states[i] for i in self.cfg.taps], dim=-1)
        pool = nn.AvgPool1d(kernel_size=self.cfg.pool_stride, stride=self.cfg.pool_stride)
        return pool(feats.transpose(1, 2)).transpose(1, 2)

    def encode_images(self, mel: torch.Tensor) -> torch.Tensor:
        return self.connector(self.audio_features(mel))

    def splice(self, input_ids: list[list[int]], audios: list[list[torch.Tensor]], max_length: int):
        """prepare_inputs_labels_for_multimodal: i-th -200 of a sample gets its i-th audio's chunks."""
        embed = self.language_model.get_input_embeddings()
        rows = []
        for ids, sample_audios in zip(input_ids, audios):
            ids = torch.tensor(ids)
            where = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
            assert len(where) == len(sample_audios)
            pieces, start = [], 0
            for pos, mel in zip(where, sample_audios):
                pieces.append(embed(ids[start:pos]))
                feats = self.encode_images(mel)  # (k, 300, H): k chunks of one audio, in time order
                pieces.append(feats.reshape(-1, feats.shape[-1]))
                start = pos + 1
            pieces.append(embed(ids[start:]))
            rows.append(torch.cat(pieces)[:max_length])
        longest = max(r.shape[0] for r in rows)
        h = rows[0].shape[-1]
        embeds = torch.zeros(len(rows), longest, h)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        pos = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):
            embeds[i, : len(r)] = r
            mask[i, : len(r)] = 1
            pos[i, : len(r)] = torch.arange(len(r))
        return embeds, mask, pos

    def forward(self, input_ids, audios, max_length: int = 4096):
        embeds, mask, pos = self.splice(input_ids, audios, max_length)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
        return out.logits, mask

    def combined_state_dict(self) -> dict[str, np.ndarray]:
        """The released checkpoint's key layout, as numpy arrays."""
        sd = {k: v.detach().numpy().copy() for k, v in self.state_dict().items()}
        if self.cfg.qwen3.tie_word_embeddings:
            sd.pop("language_model.lm_head.weight", None)
        return sd


def jax_mufun_from_torch(ref: TorchMuFun, cfg: MuFunConfig, run=None) -> MuFun:
    """A JAX MuFun whose weights come from the torch reference through the converter's mapping."""
    model = MuFun(cfg, run, rngs=nnx.Rngs(123))
    load_params(model, torch_to_flax(ref.combined_state_dict(), cfg))
    return model
