"""MuFun's chat templates and label masks, byte-identical to the reference (TinyLLaVA's
``qwen2_instruct``, ``qwen2_base`` and ``pretrain`` templates as MuFun uses them).

Text is split on ``<audio>`` and each piece is tokenised on its own (Qwen adds no BOS); the
pieces are joined with the placeholder id -200, which the splice later expands to 300 x chunks
slots. Labels are -100 everywhere except the assistant answers and their end token, computed
with the reference's own round-by-round algorithm so that masks match it exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mufun_jax.errors import InputError

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
AUDIO_TAG = "<audio>"
SEP = " ASSISTANT: "


class TemplateError(InputError):
    """A conversation the template cannot encode; ``reason`` is a short counter key."""


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    end_token: str | None  # appended to every answer; None for pretrain

    def render(self, turns: Sequence[tuple[str, str | None]]) -> str:
        """The prompt string for (question, answer) turns; an answer of None ends the prompt at
        ``"ASSISTANT:"`` (the evaluation / chat form)."""
        if self.name == "pretrain":
            return "".join(AUDIO_TAG + (a or "") + "\n" for _, a in turns)
        out = []
        for i, (q, a) in enumerate(turns):
            head = (SYSTEM + " " if i == 0 else "") + "USER: " + q + " "
            out.append(head + ("ASSISTANT:" if a is None else "ASSISTANT: " + a + self.end_token))
        return "".join(out)

    def encode(self, turns: Sequence[tuple[str, str]], tokenizer) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for a training conversation."""
        prompt = self.render(turns)
        ids = tokenize_with_audio(prompt, tokenizer)
        if self.name == "pretrain":
            return ids, [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t for t in ids]
        return ids, self.labels(prompt, ids, tokenizer)

    def labels(self, prompt: str, ids: list[int], tokenizer) -> list[int]:
        """The reference mask: per round, mask (tokens of ``part0 + " ASSISTANT: "``) - 1 tokens
        (the space after "ASSISTANT:" merges into the answer's first token), then skip the round
        and its end token; everything after the last complete round is masked."""
        labels = list(ids)
        n_end = len(tokenize_with_audio(self.end_token, tokenizer))
        cur = 0
        for rnd in prompt.split(self.end_token):
            if rnd == "":
                break
            parts = rnd.split(SEP)
            if len(parts) != 2:
                break
            instruction_len = len(tokenize_with_audio(parts[0] + SEP, tokenizer)) - 1
            round_len = len(tokenize_with_audio(rnd, tokenizer)) + n_end
            labels[cur:cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur:cur + instruction_len])
            cur += round_len
        labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
        if cur != len(ids):
            # The reference then masks the whole sample and prints a warning; a sample that trains
            # nothing is better skipped and counted.
            raise TemplateError("label_mismatch", f"label mask covers {cur} tokens but the prompt has {len(ids)} "
                                                  "(an answer or question contains ' ASSISTANT: ' or the end token?)")
        return labels


TEMPLATES = {
    "qwen2_instruct": Template("qwen2_instruct", "<|im_end|>"),
    "qwen2_base": Template("qwen2_base", "<|endoftext|>"),
    "pretrain": Template("pretrain", None),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; available: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def tokenize_with_audio(text: str, tokenizer) -> list[int]:
    """Tokenise the pieces between ``<audio>`` tags separately and join them with -200."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(AUDIO_TAG)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)
    return ids


def turns_from_conversations(conversations: Sequence[dict]) -> list[tuple[str, str]]:
    """``[{"from": "human", "value": q}, {"from": "gpt", "value": a}, ...]`` -> [(q, a), ...]."""
    if not conversations or len(conversations) % 2:
        raise TemplateError("bad_conversation",
                            f"a conversation needs human/gpt pairs; got {len(conversations or [])} messages")
    turns = []
    for i in range(0, len(conversations), 2):
        h, g = conversations[i], conversations[i + 1]
        if not (isinstance(h, dict) and isinstance(g, dict)) or h.get("from") != "human" or g.get("from") != "gpt":
            raise TemplateError("bad_conversation", f"messages {i} and {i + 1} must be from human then gpt")
        if not isinstance(h.get("value"), str) or not isinstance(g.get("value"), str):
            raise TemplateError("bad_conversation", f"messages {i} and {i + 1} need string values")
        turns.append((h["value"], g["value"]))
    return turns
