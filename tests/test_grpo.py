"""GRPO (mufun_jax/grpo): the loss and its gradient against TRL's own ``_compute_loss`` on fixed
fp32 tensors, the advantages against TRL's formula, the rewards on a table of completions, G
samples from one shared prefix against G independent requests, clear errors for bad configs, and
(slow) an interrupted run that resumes bit-identically."""

import json
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mufun_jax.grpo import loss as grpo_loss_lib
from mufun_jax.grpo import rewards as R
from mufun_jax.grpo.config import GRPOConfig

# -- the loss against TRL --------------------------------------------------------------------------


def _tensors(seed=0, rows=6, k=5):
    rng = np.random.default_rng(seed)
    logps = rng.normal(-1.5, 0.6, (rows, k)).astype(np.float32)
    old = (logps + rng.normal(0, 0.3, (rows, k))).astype(np.float32)  # ratios well outside [0.8, 1.2] too
    ref = (logps + rng.normal(0, 0.2, (rows, k))).astype(np.float32)
    mask = np.ones((rows, k), np.float32)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    adv = rng.normal(0, 1, rows).astype(np.float32)
    return logps, old, ref, mask, adv


def _trl_loss(logps, old, ref, mask, adv, *, beta, eps_low, eps_high, loss_type, max_len, use_old=True):
    """TRL 1.16.0's ``GRPOTrainer._compute_loss`` itself, on a stub trainer whose policy returns
    ``logps``; returns (loss, d loss / d logps)."""
    import torch
    from trl.trainer.grpo_trainer import GRPOTrainer

    lp = torch.tensor(logps, requires_grad=True)
    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **kw: (lp, torch.zeros_like(lp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, loss_type=loss_type, use_vllm=False,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        accelerator=types.SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x))
    rows, k = logps.shape
    inputs = {"prompt_ids": torch.zeros((rows, 2), dtype=torch.long), "prompt_mask": torch.ones((rows, 2)),
              "completion_ids": torch.zeros((rows, k), dtype=torch.long), "completion_mask": torch.tensor(mask),
              "advantages": torch.tensor(adv), "ref_per_token_logps": torch.tensor(ref)}
    if use_old:
        inputs["old_per_token_logps"] = torch.tensor(old)
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return float(loss.detach()), lp.grad.numpy(), stub._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta,eps_low,eps_high,use_old", [(0.0, 0.2, 0.2, True), (0.04, 0.2, 0.28, True),
                                                           (0.1, 0.1, 0.3, False)])
def test_loss_and_gradient_equal_trl(loss_type, beta, eps_low, eps_high, use_old):
    logps, old, ref, mask, adv = _tensors()
    want, want_grad, trl_metrics = _trl_loss(logps, old, ref, mask, adv, beta=beta, eps_low=eps_low,
                                             eps_high=eps_high, loss_type=loss_type, max_len=7, use_old=use_old)

    def f(lp):
        return grpo_loss_lib.grpo_loss(lp, jnp.asarray(old) if use_old else None, jnp.asarray(ref), jnp.asarray(adv),
                                       jnp.asarray(mask), beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
                                       loss_type=loss_type, max_completion_length=7)

    (got, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logps))
    np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["clip_ratio/region"]), trl_metrics["clip_ratio/region_mean"][0], atol=1e-6)
    if beta:
        np.testing.assert_allclose(float(metrics["kl"]), trl_metrics["kl"][0], rtol=1e-5)
    if use_old:
        assert float(metrics["clip_ratio/region"]) > 0  # the fixed tensors do exercise the clipping


@pytest.mark.parametrize("scale", [True, False])
def test_advantages_equal_trl(scale):
    """TRL 1.16.0 ``_generate_and_score_completions`` (scale_rewards "group" / "none"): group mean,
    Bessel-corrected ``nanstd``, + 1e-4."""
    import torch
    from trl.trainer.grpo_trainer import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.2, 0.9, 0.1, 0.0])
    g = 4
    mean = rewards.view(-1, g).mean(dim=1).repeat_interleave(g, dim=0)
    std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    want = rewards - mean
    if scale:
        want = want / (std + 1e-4)
    got, group_std = grpo_loss_lib.advantages(rewards.numpy(), g, scale)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    assert group_std[1] == 0.0  # an all-equal group has zero advantages (no signal)


# -- rewards -----------------------------------------------------------------------------------------

REWARD_TABLE = [  # (reward, completion, gold answer, choices, expected)
    ("label_once", "The answer is Jazz.", "B. Jazz", None, 1.0),
    ("label_once", "Jazz, definitely Jazz.", "B. Jazz", None, 0.0),  # twice
    ("label_once", "Rock.", "B. Jazz", None, 0.0),
    ("label_once", "It is a chord.", "It is a chord.", None, 1.0),
    ("wer", "hello world again", "hello world again", None, 1.0),
    ("wer", "hello word again", "hello world again", None, pytest.approx(2 / 3)),
    ("wer", "", "hello world", None, 0.0),
    ("wer", "a b c d e f g", "x", None, 0.0),  # WER > 1 is clipped
    ("r1aqa_accuracy", "<think>bass</think><answer>B</answer>", "B", ["Rock", "Jazz"], 1.0),
    ("r1aqa_accuracy", "<answer>Jazz</answer>", "B", ["Rock", "Jazz"], 1.0),
    ("r1aqa_accuracy", "<answer>Rock</answer>", "B", ["Rock", "Jazz"], 0.0),
    ("r1aqa_accuracy", "Jazz", "B", ["Rock", "Jazz"], 0.0),  # no answer tag
    ("r1aqa_format", "<think>x</think> <answer>B</answer>", "B", None, 1.0),
    ("r1aqa_format", "<answer>B</answer>", "B", None, 0.0),
    ("r1aqa_format", "<think>x</think><answer>B</answer> trailing", "B", None, 0.0),
    ("mc_accuracy", "B", "B", ["A. Rock", "B. Jazz"], 1.0),
    ("mc_accuracy", "The answer is (A).", "B", ["A. Rock", "B. Jazz"], 0.0),
    ("mc_accuracy", "It sounds like jazz to me.", "B", ["A. Rock", "B. Jazz"], 1.0),
    ("mc_accuracy", "A sine wave.", "A sine wave.", ["A sine wave.", "A square wave."], 1.0),
    ("mc_accuracy", "A square wave.", "A sine wave.", ["A sine wave.", "A square wave."], 0.0),
    ("mc_accuracy", "No idea.", "A sine wave.", ["A sine wave.", "A square wave."], 0.0),
    ("exact_match", " A sine wave.\n", "A sine wave.", None, 1.0),
    ("exact_match", "A.", "A sine wave.", ["A sine wave.", "A square wave."], 0.0),  # no letter rule
    ("exact_match", "A sine wave. A sine wave.", "A sine wave.", None, 0.0),
    ("exact_match", "a sine wave.", "A sine wave.", None, 0.0),
    ("exact_match", "", "", None, 0.0),  # no gold answer: nothing to match
]


def test_exact_match_ignore_case():
    got = R.resolve("exact_match")(["q"] * 2, ["a  SINE wave.", "a sine"], answer=["A sine wave."] * 2, ignore_case=True)
    assert got == [1.0, 0.0]


@pytest.mark.parametrize("name,completion,answer,choices,expected", REWARD_TABLE)
def test_rewards_on_a_table(name, completion, answer, choices, expected):
    assert R.resolve(name)(["q"], [completion], answer=[answer], choices=[choices]) == [expected]


def weird_reward(prompts, completions, **kw):
    """A custom reward by import path (tests.test_grpo:weird_reward): varied, deterministic values."""
    return [(sum(map(ord, c)) % 7) / 7 for c in completions]


def test_weighted_rewards_and_custom_import_path():
    specs = GRPOConfig.from_dict({"rewards": [{"name": "label_once", "weight": 2.0},
                                              {"name": "test_grpo:weird_reward", "weight": 0.5}]}).rewards
    per, total = R.score(specs, ["q", "q"], ["It is low.", "no"], {"answer": ["It is low.", "It is low."]})
    assert per[0] == [1.0, 0.0]
    assert total == pytest.approx([2.0 + 0.5 * weird_reward([], ["It is low."])[0], 0.5 * weird_reward([], ["no"])[0]])


@pytest.mark.parametrize("grpo,message", [
    ({"num_generations": 1}, "grpo.num_generations=1: must be an integer >= 2"),
    ({"beta": -0.1}, "grpo.beta=-0.1: allowed a number >= 0"),
    ({"rewards": ["accuracy_please"]}, "unknown reward 'accuracy_please'"),
    ({"rewards": ["no_such_module.sub:fn"]}, "reward 'no_such_module.sub:fn': the import path does not resolve"),
    ({"rewards": ["mufun_jax.grpo.rewards:no_such_fn"]}, "the import path does not resolve"),
    ({"loss_type": "dapo"}, "grpo.loss_type='dapo'"),
    ({"num_generation": 4}, "unknown keys in grpo: ['num_generation']"),
])
def test_bad_configs_give_clear_errors(grpo, message):
    from mufun_jax.train_config import TrainConfig

    with pytest.raises(ValueError, match=None) as e:
        TrainConfig.from_dict({"recipe": "grpo", "model": {"preset": "mufun-tiny"}, "grpo": grpo})
    assert message in str(e.value)


def test_grpo_section_needs_the_recipe():
    from mufun_jax.train_config import TrainConfig

    with pytest.raises(ValueError, match="recipe is 'sft'"):
        TrainConfig.from_dict({"model": {"preset": "mufun-tiny"}, "grpo": {"beta": 0.1}})
    with pytest.raises(ValueError, match="recipe='ppo'"):
        TrainConfig.from_dict({"recipe": "ppo", "model": {"preset": "mufun-tiny"}})


# -- rollouts: G samples from one prefix ----------------------------------------------------------------


def test_group_from_one_prefix_equals_independent_requests(tmp_path):
    """G requests of one prompt (seeds base + g) in one stream: the audio is encoded once and the
    prefix KV computed once, and every completion equals the same request run alone."""
    from flax import nnx

    from helpers import small_cfg
    from mufun_jax.engine import Generator
    from mufun_jax.grpo import rollout
    from mufun_jax.models import MuFun

    cfg = small_cfg()
    params = nnx.to_pure_dict(nnx.state(MuFun(cfg, rngs=nnx.Rngs(0))))
    params["language_model"]["lm_head"]["kernel"] = np.asarray(params["language_model"]["lm_head"]["kernel"]) * 4.0
    model = nnx.merge(nnx.graphdef(MuFun(cfg, rngs=nnx.Rngs(0))), params)
    wave = (0.3 * np.sin(2 * np.pi * 330 * np.arange(16000) / 16000)).astype(np.float32)
    from mufun_jax.audio import pad_chunks

    prompt = rollout.Prompt(0, [11, 12, -200, 13, 14, 15], [pad_chunks([wave])], [("song", 0)], {}, "")
    gcfg = GRPOConfig(num_generations=4, temperature=1.0, top_p=0.9, max_new_tokens=8)
    reqs = rollout.requests([prompt], step=3, cfg=gcfg, seed=5)
    assert len({r.sampling.seed for r in reqs}) == 4
    kw = dict(max_new_tokens=8, batch_size=4, buckets=(cfg.tokens_per_chunk + 16,), eos_token_id=())
    gen = Generator(model, **kw)
    together = rollout.generate(gen, reqs)
    stats = gen.cache_stats()
    assert stats["audio"]["computed"] == 1 and stats["prefix"]["computed"] == 1 and stats["prefix"]["reused"] == 3
    alone = []
    for r in reqs:
        gen.clear_caches()
        alone.append(rollout.generate(gen, [r])[0])
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a, b)
    assert len({tuple(a) for a in together}) > 1  # the seeds do give different samples


# -- exact resume ------------------------------------------------------------------------------------------


def _grpo_cfg(data, out, **kw):
    from helpers import SMALL_MODEL

    d = dict(recipe="grpo", output_dir=str(out), model=SMALL_MODEL, max_steps=4, save_every=2, seed=1,
             async_checkpointing=False, progress=False, trainable={"whisper": "frozen", "connector": "full",
                                                                   "llm": "full"},
             optim=dict(lr=1e-2, schedule="constant", warmup_ratio=0.0),
             data=dict(dataset=str(data / "train.json"), tokenizer=str(data / "tok"), seq_len=512, max_chunks=2),
             grpo=dict(num_generations=3, prompts_per_step=2, num_iterations=2, beta=0.05, max_new_tokens=6,
                       rollout_batch=6, rewards=["test_grpo:weird_reward"]))
    d.update(kw)
    return d


@pytest.mark.slow
def test_resumed_run_continues_bit_identically(tiny_data, tmp_path):
    from mufun_jax.checkpoint import load_params
    from mufun_jax.grpo.trainer import train
    from mufun_jax.train_config import TrainConfig

    def rows(out):
        return {json.loads(l)["step"]: json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()}

    full = tmp_path / "full"
    train(TrainConfig.from_dict(_grpo_cfg(tiny_data, full)))
    cut = tmp_path / "cut"
    train(TrainConfig.from_dict(_grpo_cfg(tiny_data, cut, max_steps=2)))
    r = train(TrainConfig.from_dict(_grpo_cfg(tiny_data, cut)))
    assert r["step"] == 4
    a, b = rows(full), rows(cut)
    assert a[1]["grad_norm"] > 0 and a[1]["kl"] >= 0 and a[3]["kl"] > 0  # rewards vary, the policy moves
    for step in (1, 2, 3, 4):
        for k in ("loss", "grad_norm", "reward", "kl", "completion_length", "clip_ratio/region"):
            assert a[step][k] == b[step][k], (step, k, a[step][k], b[step][k])
    pa, pb = load_params(full / "model"), load_params(cut / "model")
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
