"""Model FLOPs of MuFun, counted one way for every user (the AOT reports, ``bench/compare.py``).

Conventions:
- a matmul of an ``m x k`` input with a ``k x n`` weight is ``2 m k n``; elementwise work is not
  counted;
- Whisper counts only the layers that run: those up to the deepest tap;
- attention is ``2 x 2 x len_q x len_k x heads x head_dim`` per layer (scores and values).
  Causal self-attention counts the useful triangle, ``n (n + 1) / 2`` query-key pairs per
  sequence (``attention="square"`` counts ``n^2``, what a kernel without block skipping computes);
  Whisper's attention is full (non-causal);
- a training step multiplies each module's forward FLOPs (:func:`pass_multipliers`): x1 forward,
  +1 for the gradient with respect to its input when it or a module before it trains (the layers
  of a trained module pass input gradients to each other), +1 for its weight gradient when it
  trains itself; attention, which has no weights, takes +2 whenever gradients
  pass through it. Remat recomputation is not model FLOPs (it shows up as compiled / model > 1).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from mufun_jax.run_settings import MODULES


def whisper_layers_run(cfg) -> int:
    """Encoder layers that run: up to the deepest tap (no layer after it is needed)."""
    return max(cfg.taps)


def forward_flops(cfg, chunks: int, seq_lens: Sequence[int], *, head_positions: int | None = None,
                  attention: str = "causal") -> dict[str, float]:
    """Forward FLOPs of ``chunks`` 30 s audio chunks and decoder sequences of ``seq_lens`` tokens
    (audio slots included), split into ``enc_w`` / ``enc_a`` (Whisper weights / attention),
    ``conn_w``, ``llm_w`` / ``llm_a`` and ``head`` (the LM head over ``head_positions`` positions,
    default every token)."""
    if attention not in ("causal", "square"):
        raise ValueError(f"attention={attention!r} must be 'causal' or 'square'")
    w, q, c = cfg.whisper, cfg.qwen3, cfg.connector
    d, f, frames = w.d_model, w.encoder_ffn_dim, w.max_source_positions
    layers = whisper_layers_run(cfg)
    enc_w = 2 * (2 * frames) * (3 * w.num_mel_bins) * d + 2 * frames * (3 * d) * d  # conv1 (3000 frames), conv2
    enc_w += layers * 2 * frames * (4 * d * d + 2 * d * f)
    enc_a = layers * 2 * 2 * frames * frames * d
    conn = c.in_dim * c.out_dim if c.hidden_dim is None else c.in_dim * c.hidden_dim + c.hidden_dim * c.out_dim
    h, hd = q.hidden_size, q.head_dim
    layer = h * hd * (2 * q.num_attention_heads + 2 * q.num_key_value_heads) + 3 * h * q.intermediate_size
    tokens = sum(seq_lens)
    pairs = sum(n * (n + 1) / 2 if attention == "causal" else n * n for n in seq_lens)
    return {"enc_w": chunks * enc_w, "enc_a": chunks * enc_a, "conn_w": chunks * 2 * cfg.tokens_per_chunk * conn,
            "llm_w": 2 * tokens * q.num_hidden_layers * layer,
            "llm_a": q.num_hidden_layers * 2 * 2 * pairs * q.num_attention_heads * hd,
            "head": 2 * (tokens if head_positions is None else head_positions) * h * q.vocab_size}


def pass_multipliers(trainable: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """(weight matmuls, attention) multiplier of each module's forward FLOPs in a training step."""
    out, upstream = {}, False
    for m in MODULES:
        trained = trainable.get(m, "full") == "full"
        # a trained module's layers pass input gradients to each other even when nothing before it trains
        out[m] = (1 + int(upstream or trained) + int(trained), 1 + 2 * int(upstream or trained))
        upstream = upstream or trained
    return out


def train_flops(cfg, trainable: Mapping[str, str], chunks: int, seq_lens: Sequence[int], *,
                attention: str = "causal") -> float:
    """Model FLOPs of one training micro-batch (forward and backward)."""
    p = forward_flops(cfg, chunks, seq_lens, attention=attention)
    m = pass_multipliers(trainable)
    return (m["whisper"][0] * p["enc_w"] + m["whisper"][1] * p["enc_a"] + m["connector"][0] * p["conn_w"]
            + m["llm"][0] * (p["llm_w"] + p["head"]) + m["llm"][1] * p["llm_a"])


def prefill_flops(cfg, chunks: int, seq_lens: Sequence[int]) -> float:
    """Encoding ``chunks`` and prefilling the prompts, the LM head at each prompt's last position."""
    return sum(forward_flops(cfg, chunks, seq_lens, head_positions=len(seq_lens)).values())


def decode_flops(cfg, batch: int, cache_len: int) -> float:
    """One decode step of ``batch`` rows, each attending to ``cache_len`` positions."""
    q = cfg.qwen3
    p = forward_flops(cfg, 0, [1] * batch)
    attn = q.num_hidden_layers * 2 * 2 * batch * cache_len * q.num_attention_heads * q.head_dim
    return p["llm_w"] + p["head"] + attn


def answer_flops(cfg, chunks: int, prompt_len: int, new_tokens: int) -> float:
    """One whole answer: prefill, then a decode step per generated token after the first."""
    return prefill_flops(cfg, chunks, [prompt_len]) + sum(decode_flops(cfg, 1, prompt_len + i)
                                                         for i in range(1, new_tokens))
