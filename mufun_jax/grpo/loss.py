"""The GRPO objective as TRL 1.16.0 defines it (``trl/trainer/grpo_trainer.py``:
``_generate_and_score_completions`` for the advantages, ``_compute_loss`` for the loss, with
``importance_sampling_level="token"``, ``delta=None``, no vLLM correction, no entropy terms).

Re-derived here in JAX rather than imported, so the train step stays one jitted function;
tests/test_grpo.py calls TRL's own ``_compute_loss`` on the same fp32 tensors and compares the loss
and its gradient for every aggregation.

Per completion token t of row i, with ratio r = exp(logp - logp_old) and advantage A_i:
    loss_it = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) + beta * (exp(ref - logp) - (ref - logp) - 1)
aggregated as ``grpo`` (mean over each row's tokens, then over rows), ``bnpo`` (mean over all
tokens) or ``dr_grpo`` (sum over tokens / (rows x max_completion_length)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STD_EPS = 1e-4  # TRL adds this to the group std


def advantages(rewards, num_generations: int, scale: bool = True) -> np.ndarray:
    """Group-normalised advantages (TRL's ``scale_rewards="group"`` or ``"none"``): rewards
    (rows,) in groups of ``num_generations`` consecutive rows; the std is Bessel-corrected
    (TRL's ``nanstd``). Returns (advantages, per-group std)."""
    r = np.asarray(rewards, np.float64).reshape(-1, num_generations)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=1, keepdims=True)
    adv = r - mean
    if scale:
        adv = adv / (std + STD_EPS)
    return adv.reshape(-1).astype(np.float32), std[:, 0].astype(np.float32)


def per_token_loss(logps, old_logps, ref_logps, adv, *, beta: float, epsilon_low: float, epsilon_high: float):
    """(per-token loss, ratio, per-token KL or None); ``old_logps`` None means "the same policy"
    (TRL's ``per_token_logps.detach()`` when mu = 1)."""
    old = jax.lax.stop_gradient(logps) if old_logps is None else old_logps
    ratio = jnp.exp(logps - old)
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    a = adv[:, None]
    loss = -jnp.minimum(ratio * a, clipped * a)
    kl = None
    if beta != 0.0:
        d = ref_logps - logps
        kl = jnp.exp(d) - d - 1
        loss = loss + beta * kl
    return loss, ratio, kl


def aggregate(loss, mask, loss_type: str, max_completion_length: int):
    """The scalar loss from per-token losses (rows, tokens) and the completion mask."""
    m = mask.astype(loss.dtype)
    if loss_type == "grpo":
        return jnp.mean(jnp.sum(loss * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0))
    if loss_type == "bnpo":
        return jnp.sum(loss * m) / jnp.maximum(jnp.sum(m), 1.0)
    if loss_type == "dr_grpo":
        return jnp.sum(loss * m) / (loss.shape[0] * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_loss(logps, old_logps, ref_logps, adv, mask, *, beta: float, epsilon_low: float, epsilon_high: float,
              loss_type: str, max_completion_length: int):
    """(scalar loss, metrics): KL and clip fractions averaged over completion tokens, as TRL logs them."""
    loss, ratio, kl = per_token_loss(logps, old_logps, ref_logps, adv, beta=beta, epsilon_low=epsilon_low,
                                     epsilon_high=epsilon_high)
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    mean = lambda x: jnp.sum(x.astype(jnp.float32) * m) / n
    low = (ratio < 1 - epsilon_low) & (adv[:, None] < 0)
    high = (ratio > 1 + epsilon_high) & (adv[:, None] > 0)
    metrics = {"clip_ratio/low": mean(low), "clip_ratio/high": mean(high), "clip_ratio/region": mean(low | high),
               "kl": mean(kl) if kl is not None else jnp.float32(0)}
    return aggregate(loss, mask, loss_type, max_completion_length), metrics
