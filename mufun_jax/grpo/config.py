"""The ``grpo:`` section of a training config (used when ``recipe: grpo``).

Checked when the config loads, so a bad value fails before anything is compiled or written: a
group of fewer than two samples has no relative advantage, a negative KL weight rewards drifting
away from the reference, and an unknown or unimportable reward would otherwise fail at the first
rollout, minutes into a run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward function: a built-in name (:data:`mufun_jax.grpo.rewards.BUILTIN`) or an import
    path ``package.module:function``, its weight, and keyword arguments bound to it."""

    name: str
    weight: float = 1.0
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    num_generations: int = 8  # G: completions per prompt
    prompts_per_step: int = 4  # P: prompts per rollout batch (P x G rows per update)
    num_iterations: int = 1  # mu: policy updates per rollout batch
    beta: float = 0.0  # KL weight (k3 estimator); > 0 computes the reference model's log-probs
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "grpo"  # grpo (per-sequence mean) | bnpo (per-token mean) | dr_grpo (/ rows x max tokens)
    scale_rewards: bool = True  # divide advantages by the group's std (+1e-4)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    rollout_batch: int = 32  # decode slots of the engine
    logp_chunk: int = 0  # completion positions per chunk of the log-prob vocabulary projection (0: all)
    tasks: tuple = ()  # keep only records whose "task" is one of these (empty: all)
    eval_every: int = 0  # greedy held-out rewards every N steps (needs data.eval_dataset; 0: off)
    eval_prompts: int | None = None  # cap on held-out prompts (None: all)
    rewards: tuple = (RewardSpec("label_once"),)

    def __post_init__(self):
        bad = []
        ints = dict(num_generations=2, prompts_per_step=1, num_iterations=1, max_new_tokens=1, rollout_batch=1)
        for k, lo in ints.items():
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                why = " (a group needs at least 2 samples to compare)" if k == "num_generations" else ""
                bad.append(f"grpo.{k}={v!r}: must be an integer >= {lo}{why}")
        for k, ok, allowed in [
            ("beta", _num(self.beta) and 0 <= self.beta < math.inf, "a number >= 0 (0: no KL term, no reference)"),
            ("epsilon_low", _num(self.epsilon_low) and 0 <= self.epsilon_low < 1, "a number in [0, 1)"),
            ("epsilon_high", _num(self.epsilon_high) and 0 <= self.epsilon_high, "a number >= 0"),
            ("loss_type", self.loss_type in LOSS_TYPES, " | ".join(LOSS_TYPES)),
            ("scale_rewards", isinstance(self.scale_rewards, bool), "true or false"),
            ("temperature", _num(self.temperature) and self.temperature > 0, "a number > 0 (GRPO needs sampling)"),
            ("top_p", _num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("logp_chunk", isinstance(self.logp_chunk, int) and self.logp_chunk >= 0, "an integer >= 0"),
            ("eval_every", isinstance(self.eval_every, int) and self.eval_every >= 0, "an integer >= 0"),
            ("rewards", len(self.rewards) > 0, "at least one reward"),
        ]:
            if not ok:
                bad.append(f"grpo.{k}={getattr(self, k)!r}: allowed {allowed}")
        if bad:
            raise ValueError("bad grpo config value" + ("s" if len(bad) > 1 else "") + ": " + "; ".join(bad))
        from mufun_jax.grpo.rewards import resolve  # imported here: rewards import optional libraries lazily

        for r in self.rewards:
            resolve(r.name)  # an unknown name or unimportable path fails now, naming it

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "GRPOConfig":
        d = dict(d or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown keys in grpo: {unknown}; known: {sorted(fields)}")
        if "rewards" in d:
            d["rewards"] = tuple(_reward(r) for r in (d["rewards"] or ()))
        if "tasks" in d:
            d["tasks"] = tuple(d["tasks"] or ())
        for k in ("beta", "epsilon_low", "epsilon_high", "temperature", "top_p"):
            if isinstance(d.get(k), str):
                try:
                    d[k] = float(d[k])
                except ValueError:
                    raise ValueError(f"grpo.{k}={d[k]!r} must be a number") from None
        return cls(**d)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks)
        out["rewards"] = [dataclasses.asdict(r) for r in self.rewards]
        return out


def _reward(r) -> RewardSpec:
    """``name`` or ``{name: ..., weight: ..., kwargs: {...}}``."""
    if isinstance(r, str):
        return RewardSpec(r)
    if isinstance(r, Mapping) and "name" in r and set(r) <= {"name", "weight", "kwargs"}:
        w = r.get("weight", 1.0)
        if not _num(w):
            raise ValueError(f"grpo.rewards: weight={w!r} of {r['name']!r} must be a number")
        return RewardSpec(str(r["name"]), float(w), dict(r.get("kwargs") or {}))
    raise ValueError(f"grpo.rewards: {r!r} must be a name or {{name, weight, kwargs}}")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
