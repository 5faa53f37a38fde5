"""Prompts, rollouts on the engine, and the teacher-forced batch the update reads.

**Prompts.** The dataset's records (MuFun's training schema) in a permutation per epoch drawn
from ``data.seed``; step ``s`` takes records ``s*P .. s*P+P-1`` of that stream. The position is a
function of the step, so a resumed run sees the same prompts without any loader state.

**Rollouts.** Each prompt becomes G :class:`~mufun_jax.generate.Request` objects with the same
ids, the same audio (and audio key) and seeds ``base + g``. The engine encodes the audio once and
computes the prefix (system prompt + audio) KV once, then copies it into G decode slots.

**Batch.** Row ``p*G + g`` holds prompt p followed by completion g; ``gather`` picks the
positions that predict the completion tokens; ``waves`` hold each prompt's chunks once, and every
row of a group points at them (``audio_slots``), so the update encodes each song once too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mufun_jax import audio as audio_lib
from mufun_jax.data.dataset import audio_root_for, read_records, segments
from mufun_jax.data.templates import get_template, tokenize_with_audio, turns_from_conversations
from mufun_jax.generate import Request
from mufun_jax.sampling import SamplingParams
from mufun_jax.splice import expand_placeholders


@dataclasses.dataclass
class Prompt:
    index: int  # position in the dataset
    ids: list  # prompt tokens, one -200 per audio
    chunks: list  # per audio: (chunks, 480000) float32
    keys: list  # per audio: a cache key
    fields: dict  # answer, choices, task, ... for the rewards
    text: str


class PromptSource:
    """The dataset's records as GRPO prompts (the question turns; the last answer is the gold)."""

    def __init__(self, path, tokenizer, *, template: str, audio_root=None, seed: int = 0, tasks=()):
        recs = read_records(path)
        self.records = [r for r in recs if not tasks or r.get("task") in tasks]
        if not self.records:
            raise ValueError(f"{path}: no records" + (f" with task in {list(tasks)}" if tasks else ""))
        self.root = audio_root_for(path, audio_root)
        self.tokenizer, self.template, self.seed = tokenizer, get_template(template), seed

    def __len__(self) -> int:
        return len(self.records)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.records))

    def batch(self, step: int, n: int) -> list[Prompt]:
        out = []
        for j in range(step * n, step * n + n):
            epoch, k = divmod(j, len(self.records))
            out.append(self.prompt(int(self.order(epoch)[k])))
        return out

    def prompt(self, i: int) -> Prompt:
        r = self.records[i]
        turns = turns_from_conversations(r["conversations"])
        gold = r.get("answer", turns[-1][1])
        text = self.template.render([*turns[:-1], (turns[-1][0], None)])
        ids = tokenize_with_audio(text, self.tokenizer)
        paths = r.get("audio") or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        chunks, keys = [], []
        for p, seg in zip(paths, segments(r.get("time"), len(paths))):
            full = Path(p) if Path(p).is_absolute() else Path(self.root) / p
            chunks.append(audio_lib.pad_chunks(audio_lib.chunk(audio_lib.load_audio(full, seg))))
            keys.append(("grpo", str(full), tuple(seg) if seg else None))
        fields = {k: v for k, v in r.items() if k not in ("conversations", "audio", "time")}
        fields.update(answer=gold, choices=r.get("choices"))
        return Prompt(i, ids, chunks, keys, fields, text)


def stop_ids(tokenizer, template: str) -> list[int]:
    """The template's end token, ``<|im_end|>`` and the tokenizer's eos, as the API stops on."""
    vocab, ids = tokenizer.get_vocab(), []
    for t in ("<|im_end|>", get_template(template).end_token, tokenizer.eos_token):
        if t and t in vocab and vocab[t] not in ids:
            ids.append(int(vocab[t]))
    return ids


def decode(tokenizer, ids, stops) -> str:
    ids = [int(t) for t in ids]
    if ids and ids[-1] in stops:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def sample_seed(base: int, step: int, prompt: int, g: int, prompts: int, groups: int) -> int:
    """Request seeds: distinct per (step, prompt, g), a function of them only (exact resume)."""
    return (base * 1_000_003 + (step * prompts + prompt) * groups + g) % (2 ** 31 - 1)


def requests(prompts: list[Prompt], step: int, cfg, seed: int) -> list[Request]:
    """G requests per prompt, same ids and audio, seeds ``base + g``."""
    out = []
    for p, pr in enumerate(prompts):
        for g in range(cfg.num_generations):
            sp = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                seed=sample_seed(seed, step, p, g, len(prompts), cfg.num_generations),
                                max_tokens=cfg.max_new_tokens)
            out.append(Request(pr.ids, pr.chunks, audio_keys=pr.keys, sampling=sp))
    return out


def generate(gen, reqs: list[Request]) -> list[np.ndarray]:
    """Completion token ids per request (stop token included, as TRL's completion mask keeps it)."""
    out = [None] * len(reqs)
    for i, o in gen.stream(reqs):
        out[i] = np.asarray(o.token_ids, np.int32)
    return out


def build_batch(prompts: list[Prompt], completions: list[np.ndarray], groups: int, *, tokens_per_chunk: int,
                max_new_tokens: int, pad_id: int, buckets=(256, 512, 1024, 2048, 4096)) -> dict:
    """Numpy arrays: input_ids/audio_slots/positions/segment_ids (rows, T), waves (chunks, 480000),
    gather/targets/mask (rows, max_new_tokens). T is the smallest bucket that holds every row."""
    rows = []
    waves, offset = [], 0
    for p, pr in enumerate(prompts):
        cpa = [len(c) for c in pr.chunks]
        e_ids, _, slots = expand_placeholders(pr.ids, cpa, tokens_per_chunk=tokens_per_chunk, chunk_offset=offset)
        waves.extend(pr.chunks)
        offset += sum(cpa)
        for g in range(groups):
            rows.append((e_ids, slots, completions[p * groups + g]))
    longest = max(len(e) for e, _, _ in rows) + max_new_tokens
    t = next((b for b in buckets if b >= longest), longest)
    b, k = len(rows), max_new_tokens
    ids = np.full((b, t), pad_id, np.int32)
    aslots = np.full((b, t), -1, np.int32)
    seg = np.zeros((b, t), np.int32)
    gather, targets, mask = np.zeros((b, k), np.int32), np.zeros((b, k), np.int32), np.zeros((b, k), bool)
    for r, (e, s, c) in enumerate(rows):
        n, c = len(e), np.asarray(c[:k])
        ids[r, :n], ids[r, n:n + len(c)] = e, c
        aslots[r, :n] = s
        seg[r, :n + len(c)] = 1
        gather[r, :len(c)] = n - 1 + np.arange(len(c))
        targets[r, :len(c)] = c
        mask[r, :len(c)] = True
    wav = np.concatenate(waves) if waves else np.zeros((0, audio_lib.CHUNK_SAMPLES), np.float32)
    n_chunks = 1 << max(len(wav) - 1, 0).bit_length()  # a power of two: few compiled shapes
    wav = np.concatenate([wav, np.zeros((n_chunks - len(wav), wav.shape[1]), np.float32)])
    return {"input_ids": ids, "audio_slots": aslots, "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
            "segment_ids": seg, "waves": wav.astype(np.float32), "gather": gather, "targets": targets, "mask": mask}


def token_logps(model, batch: dict, temperature: float = 1.0, chunk: int = 0):
    """log p(completion token) under ``softmax(logits / temperature)`` (TRL's), teacher-forced,
    (rows, max_new_tokens), 0 where ``mask`` is off. With ``chunk`` the vocabulary projection runs
    on that many completion positions at a time (rematerialised), so (rows, K, vocab) fp32 logits
    never exist at once."""
    audio = model.encode_audio(batch["waves"])
    embeds = model.embed_inputs(batch["input_ids"], audio, batch["audio_slots"])
    hidden, _ = model.hidden_states(embeds, batch["positions"], batch["segment_ids"])
    hs = jnp.take_along_axis(hidden, batch["gather"][..., None], axis=1)  # (B, K, H)

    def piece(h, t):
        logits = model.logits(h) / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        gold = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return gold - lse

    k = hs.shape[1]
    if chunk <= 0 or chunk >= k:
        lp = piece(hs, batch["targets"])
    else:
        n = -(-k // chunk)
        pad = n * chunk - k
        h = jnp.pad(hs, ((0, 0), (0, pad), (0, 0))).reshape(hs.shape[0], n, chunk, -1).swapaxes(0, 1)
        t = jnp.pad(batch["targets"], ((0, 0), (0, pad))).reshape(hs.shape[0], n, chunk).swapaxes(0, 1)
        lp = jax.lax.map(lambda xs: jax.checkpoint(piece)(*xs), (h, t)).swapaxes(0, 1).reshape(hs.shape[0], -1)[:, :k]
    return jnp.where(batch["mask"], lp, 0.0)
