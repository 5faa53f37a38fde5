"""Reward functions: ``fn(prompts, completions, **kw) -> list[float]``, one value per completion.

This is the signature TRL and Tunix use. ``kw`` carries the records' fields, one list entry per
completion: ``answer`` (the gold text: the record's ``answer`` or its last gpt turn), ``choices``
(options of a multiple-choice record, or None), ``task``, and any other field of the records.
Custom rewards are given by import path (``package.module:function``) and receive the same.

Built-ins (:data:`BUILTIN`):
- ``label_once``: the reference's ``reward_gt`` (``tinyllava/train/train_grpo.py``): 1 when the
  gold label's text, after its ``"X. "`` prefix, occurs exactly once in the completion.
- ``wer``: ``max(0, 1 - WER)`` between the gold lyrics and the completion, with jiwer (the
  reference hand-rolled its WER).
- ``r1aqa_accuracy`` / ``r1aqa_format``: R1-AQA's rewards (Li et al., 2025): the text inside
  ``<answer>...</answer>`` equals the gold answer (its letter or its option text); the completion
  is ``<think>...</think><answer>...</answer>``.
- ``mc_accuracy``: multiple-choice accuracy through the evaluation's extractor
  (:func:`mufun_jax.evaluate.extract.regex_extract`): the option letter the completion names equals
  the gold one. The options are the record's ``choices`` (or the kwarg ``options``).
- ``exact_match``: the completion, stripped, is the gold answer (with ``ignore_case``, up to case).
  The demo's held-out metric; a reward that equals the metric cannot be gamed around it, as the
  extractor's bare-letter rule was (``"A."`` read as option A).
"""

from __future__ import annotations

import importlib
import re
import string
from typing import Callable, Sequence

from mufun_jax.evaluate.data import option_text
from mufun_jax.evaluate.extract import regex_extract

RewardFn = Callable[..., list]
LETTERS = string.ascii_uppercase


def _label_text(answer: str) -> str:
    return option_text(answer or "")


def label_once(prompts, completions, answer, **kw) -> list[float]:
    out = []
    for c, a in zip(completions, answer):
        label = _label_text(a)
        out.append(1.0 if label and c.count(label) == 1 else 0.0)
    return out


def exact_match(prompts, completions, answer, ignore_case: bool = False, **kw) -> list[float]:
    norm = (lambda t: " ".join((t or "").split()).lower()) if ignore_case else (lambda t: (t or "").strip())
    return [1.0 if norm(a) and norm(c) == norm(a) else 0.0 for c, a in zip(completions, answer)]


def wer(prompts, completions, answer, **kw) -> list[float]:
    import jiwer  # optional dependency (the grpo extra): only the lyrics reward needs it

    out = []
    for c, a in zip(completions, answer):
        ref, hyp = " ".join((a or "").split()), " ".join((c or "").split())
        if not ref:
            out.append(1.0 if not hyp else 0.0)
            continue
        out.append(max(0.0, 1.0 - float(jiwer.wer(ref, hyp or "<empty>"))))
    return out


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.S)


def _options(choices, options=None) -> list[tuple[str, str]] | None:
    opts = options if options is not None else choices
    if not opts:
        return None
    return [(LETTERS[i], o) for i, o in enumerate(opts)]


def _gold_letter(answer: str, opts: list[tuple[str, str]]) -> str | None:
    a = (answer or "").strip()
    letters = [l for l, _ in opts]
    if a.rstrip(".") in letters:
        return a.rstrip(".")
    for letter, o in opts:
        if a in (o, option_text(o)) or option_text(a) == option_text(o):
            return letter
    return None


def r1aqa_accuracy(prompts, completions, answer, choices=None, **kw) -> list[float]:
    out = []
    choices = choices or [None] * len(completions)
    for c, a, ch in zip(completions, answer, choices):
        m = _ANSWER.search(c or "")
        said = (m.group(1) if m else "").strip().lower().rstrip(".")
        gold = {(a or "").strip().lower().rstrip("."), _label_text(a).lower().rstrip(".")} - {""}
        opts = _options(ch)
        if opts:
            g = _gold_letter(a, opts)
            if g:
                gold |= {g.lower(), option_text(dict(opts)[g]).lower().rstrip(".")}
        out.append(1.0 if m and said in gold else 0.0)
    return out


def r1aqa_format(prompts, completions, **kw) -> list[float]:
    return [1.0 if _FORMAT.fullmatch(c or "") else 0.0 for c in completions]


def mc_accuracy(prompts, completions, answer, choices=None, options: Sequence[str] | None = None, **kw) -> list[float]:
    out = []
    choices = choices or [None] * len(completions)
    for c, a, ch in zip(completions, answer, choices):
        opts = _options(ch, options)
        if not opts:
            raise ValueError("mc_accuracy needs options: a 'choices' list in each record, or kwargs: {options: [...]}")
        gold = _gold_letter(a, opts)
        out.append(1.0 if gold is not None and regex_extract(c, opts) == gold else 0.0)
    return out


BUILTIN: dict[str, RewardFn] = {"label_once": label_once, "exact_match": exact_match, "wer": wer, "r1aqa_accuracy": r1aqa_accuracy,
                                "r1aqa_format": r1aqa_format, "mc_accuracy": mc_accuracy}


def resolve(name: str) -> RewardFn:
    """A built-in name, or ``package.module:function`` (also ``package.module.function``)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if not isinstance(name, str) or ("." not in name and ":" not in name):
        raise ValueError(f"unknown reward {name!r}: built-ins are {sorted(BUILTIN)}, or give an import path "
                         "'package.module:function'")
    mod, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {name!r}: the import path does not resolve ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {mod}.{attr} is not callable")
    return fn


def score(specs, prompts: list, completions: list[str], fields: dict) -> tuple[list[list[float]], list[float]]:
    """Every reward on every completion: (per-function values [F][N], weighted sums [N])."""
    per = []
    for spec in specs:
        vals = resolve(spec.name)(prompts, completions, **fields, **spec.kwargs)
        vals = [float("nan") if v is None else float(v) for v in vals]
        if len(vals) != len(completions):
            raise ValueError(f"reward {spec.name!r} returned {len(vals)} values for {len(completions)} completions")
        per.append(vals)
    total = [sum(0.0 if v != v else s.weight * v for s, v in zip(specs, col)) for col in zip(*per)]  # TRL's nansum
    return per, total
