"""The Python inference API: load a checkpoint, then ``chat``, ``generate`` in batches, or ``score``
multiple-choice candidates.

    from mufun_jax import MuFun

    model = MuFun.from_pretrained("converted/mufun-instruct", dtype="bfloat16")
    model.chat("What genre is this?", audio_files="song.mp3", segs=[10.0, 40.0])
    model.generate([{"prompt": "<audio>\\nDescribe the rhythm.", "audio": "a.wav"},
                    {"prompt": "Which is faster? <audio> or <audio>", "audio": ["b.flac", "c.mp3"]}])
    model.score("<audio>\\nWhich instrument plays?", ["piano", "guitar"], audio_files="d.wav")

How a prompt is built, as the reference ``chat()`` does:
- each audio goes to its ``<audio>`` tag, in order; a prompt without a tag and exactly one audio gets
  the tag at its start, ``"<audio>\\n" + prompt`` (the form of the training data);
- the text is rendered in the evaluation form of the chat template
  (``SYSTEM + " USER: " + prompt + " ASSISTANT:"`` for ``qwen2_instruct``), split on ``<audio>`` and
  tokenised piece by piece;
- generation stops at the template's end token (``<|im_end|>``) or the tokenizer's eos, both looked
  up in the tokenizer; the answer is the new tokens only, decoded without special tokens and stripped.

The engine is :class:`mufun_jax.engine.Generator`: continuous batching over ``batch_size`` decode
slots, each audio encoded once (keyed by a hash of its decoded samples, or by the request's own
``audio_id``: one song under two paths is encoded once) and each prompt prefix
(system prompt, ``USER:``, the audio) prefilled once for all the questions about it.
:meth:`MuFun.iter_results` feeds it lazily: requests are taken in windows of ``window``, whose audio
is decoded on a thread pool while the engine works, and results come back in input order or, with
``ordered=False``, as they complete. A request that cannot be served (missing or undecodable audio,
a bad segment, a tag/audio count mismatch, too long for the largest bucket) becomes a
:class:`Result` with ``error`` set; the others complete.
"""

from __future__ import annotations

import collections
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from mufun_jax.config import MuFunConfig
from mufun_jax.data.templates import AUDIO_TAG, get_template, tokenize_with_audio
from mufun_jax.sampling import SamplingParams
from mufun_jax.request import (RequestError, Result, _audio_keys, _Prepared, _segments,  # noqa: F401 - re-exported
                               load_request_audio, parse_request)

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (256, 512, 1024, 2048, 4096)  # padded prompt lengths, cut at the model's max length


def _dtype_name(name) -> str | None:
    if name is None:
        return None
    import jax.numpy as jnp

    return jnp.dtype(name).name


class MuFun:
    """A MuFun model ready for inference: the nnx model, its tokenizer, the chat template and a
    batched :class:`~mufun_jax.generate.Generator`. Build it with :meth:`from_pretrained`, or wrap
    an in-memory :class:`mufun_jax.models.MuFun` with ``MuFun(model, tokenizer)``.

    ``batch_size`` rows run together; ``max_new_tokens`` is the default cap and sizes the KV cache
    (a call asking for more gets a second generator, compiled once); ``buckets`` are the padded
    prompt lengths (default: 256 ... up to the config's ``tokenizer_model_max_length``);
    ``generator_kw`` go to :class:`~mufun_jax.generate.Generator` (``max_chunks``,
    ``max_batch_chunks``, ``chunk_buckets``, ``prefill_chunk``). ``audio_root`` resolves relative
    audio paths; ``workers`` threads decode audio."""

    def __init__(self, model, tokenizer, *, template: str = "qwen2_instruct", batch_size: int = 8,
                 max_new_tokens: int = 512, buckets: Sequence[int] | None = None, audio_root=None,
                 workers: int | None = None, window: int | None = None, **generator_kw):
        from mufun_jax.engine import Generator

        self.model = model
        self.cfg: MuFunConfig = model.cfg
        self.tokenizer = tokenizer
        self.template = get_template(template)
        if self.template.name == "pretrain":
            raise ValueError("the pretrain template drops the question; use qwen2_instruct or qwen2_base")
        self.audio_root = audio_root
        self.workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
        if buckets is None:
            limit = self.cfg.tokenizer_model_max_length
            buckets = tuple(b for b in DEFAULT_BUCKETS if b < limit) + (limit,)
        self.window = int(window) if window is not None else 8 * int(batch_size)
        self._gen_kw = dict(batch_size=batch_size, buckets=tuple(buckets), **generator_kw)
        self.stop_ids = self._stop_ids()
        self.generator = Generator(model, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                   pad_token_id=self.cfg.pad_token_id, **self._gen_kw)
        self._generators = {self.generator.max_new_tokens: self.generator}
        if len(tokenizer) > self.cfg.qwen3.vocab_size:
            log.warning("the tokenizer has %d tokens but the model's vocabulary only %d", len(tokenizer),
                        self.cfg.qwen3.vocab_size)

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, dtype: str | None = None, param_dtype: str | None = None,
                        attention_impl: str = "auto", quantize: str | None = None, adapter=None, mesh=None,
                        tokenizer=None, **kw) -> "MuFun":
        """Load a model directory (``convert_weights.py import`` or train.py's ``OUTPUT_DIR/model``)
        or a PyTorch MuFun directory (the released combined checkpoint, or the per-component folders;
        converted in memory one tensor at a time, safetensors without torch).

        Run settings are chosen here, never read from the checkpoint: ``dtype`` is the compute dtype
        (default: float32 on CPU, bfloat16 on TPU and GPU); parameters are held in ``param_dtype``
        (default: ``dtype``, as the reference loads with ``torch_dtype``); ``attention_impl`` picks
        the attention backend of the no-cache path (scoring), ``auto`` by platform. ``quantize``
        (``int8`` or ``nf4``) stores every linear layer's weights and the embedding as codes +
        scales (weight-only; compute stays in ``dtype``): int8 is about half the bytes of bf16.
        ``adapter``: a PEFT LoRA adapter directory (``convert_weights.py export-adapter``, or one
        trained with PEFT on the PyTorch MuFun), merged into the weights at load. ``mesh`` (a
        ``(data, fsdp, tensor)`` mesh from :func:`mufun_jax.sharding.make_mesh`) shards the
        parameters by their logical axes and the engine's KV cache (kv heads over ``tensor``, slots
        over ``data``); without it they go to the default device. ``tokenizer``:
        a tokenizer or a directory (default: the checkpoint's own files). Other keywords go to the
        constructor."""
        import jax

        from mufun_jax.data.dataset import dataset_tokenizer
        from mufun_jax.loading import load_model
        from mufun_jax.run_settings import RunSettings

        path = Path(path)
        dtype = _dtype_name(dtype) or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        run = RunSettings(dtype=dtype, param_dtype=_dtype_name(param_dtype) or dtype, attention_impl=attention_impl,
                          quantize=quantize)
        model = load_model(path, run, mesh=mesh, adapter=adapter)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tok_dir = Path(tokenizer) if tokenizer is not None else path
            if not any((tok_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
                raise FileNotFoundError(f"{tok_dir}: no tokenizer files; pass tokenizer=DIR")
            tokenizer = dataset_tokenizer(tok_dir)
        return cls(model, tokenizer, mesh=mesh, **kw)

    def _stop_ids(self) -> list[int]:
        tok = self.tokenizer
        vocab = tok.get_vocab()
        ids = []
        for t in ("<|im_end|>", self.template.end_token, tok.eos_token):
            if t and t in vocab and vocab[t] not in ids:
                ids.append(int(vocab[t]))
        if tok.eos_token_id is not None and int(tok.eos_token_id) not in ids:
            ids.append(int(tok.eos_token_id))
        return ids

    def _generator(self, cap: int):
        from mufun_jax.engine import Generator

        if cap <= self.generator.max_new_tokens:
            return self.generator
        size = 1 << (cap - 1).bit_length()
        if size not in self._generators:
            self._generators[size] = Generator(self.model, max_new_tokens=size, eos_token_id=self.stop_ids,
                                               pad_token_id=self.cfg.pad_token_id, **self._gen_kw)
        return self._generators[size]

    def cache_stats(self) -> dict:
        """Hits and misses of the audio and prefix caches, summed over this model's generators."""
        out = {"audio": {}, "prefix": {}}
        for gen in self._generators.values():
            for name, st in gen.cache_stats().items():
                for k, v in st.items():
                    out[name][k] = out[name].get(k, 0) + v
        return out

    # -- prompts -----------------------------------------------------------------------------------

    def build_prompt(self, prompt: str, n_audios: int) -> str:
        """The template's evaluation form of ``prompt``, with ``<audio>\\n`` put first when the prompt
        has no tag and there is one audio."""
        if AUDIO_TAG not in prompt and n_audios == 1:
            prompt = AUDIO_TAG + "\n" + prompt
        n_tags = prompt.count(AUDIO_TAG)
        if n_tags != n_audios:
            raise RequestError("audio_tag_mismatch", f"the prompt has {n_tags} <audio> tags for {n_audios} audios")
        return self.template.render([(prompt, None)])

    def _candidate_ids(self, prompt_text: str, prompt_ids: list[int], cand, end_token: bool) -> list[int]:
        if not isinstance(cand, str):
            ids = [int(t) for t in cand]
        else:
            # In training text the answer follows " ASSISTANT: ", so the space belongs to its first token.
            full = tokenize_with_audio(prompt_text + " " + cand, self.tokenizer)
            if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
                ids = full[len(prompt_ids):]
            else:
                ids = list(self.tokenizer(" " + cand, add_special_tokens=False).input_ids)
            if end_token and self.template.end_token:
                ids += list(self.tokenizer(self.template.end_token, add_special_tokens=False).input_ids)
        if not ids or min(ids) < 0:
            raise RequestError("bad_candidate", f"candidate {cand!r} has no tokens, or an <audio> tag")
        return ids

    def decode(self, token_ids: Sequence[int], finish_reason: str | None = None) -> str:
        ids = [int(t) for t in token_ids]
        if finish_reason == "stop" and ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # -- the pipeline ------------------------------------------------------------------------------

    def _prepare_text(self, req, index: int, seed: int, audio_root) -> _Prepared:
        try:
            r = parse_request(req, index)
        except RequestError as e:
            rid = req.get("id", index) if isinstance(req, dict) else index
            return _Prepared(index, rid, error=e)
        p = _Prepared(index, r["id"], seed=seed if r["seed"] is None else int(r["seed"]),
                      max_new_tokens=r["max_new_tokens"], candidates=r["candidates"], audio_ids=r["audio_id"])
        try:
            p.prompt_text = self.build_prompt(r["prompt"], len(r["audio"]))
            p.input_ids = tokenize_with_audio(p.prompt_text, self.tokenizer)
            _segments(r["time"], len(r["audio"]))  # fail before decoding anything
        except RequestError as e:
            p.error = e
        p.raw = (r["audio"], r["time"], audio_root)
        return p

    @staticmethod
    def _load(p: _Prepared) -> _Prepared:
        if p.error is None:
            try:
                p.audios = load_request_audio(*p.raw)
            except RequestError as e:
                p.error = e
            if p.error is None:
                p.audio_keys = _audio_keys(p.audios, p.audio_ids, p.raw[1])
        return p

    def _check(self, p: _Prepared, score: bool, end_token: bool) -> None:
        from mufun_jax.generate import Request

        if p.error is not None:
            return
        try:
            if score:
                if not p.candidates:
                    raise RequestError("no_candidates", "score mode needs a non-empty 'candidates' list")
                p.candidates_ids = [self._candidate_ids(p.prompt_text, p.input_ids, c, end_token)
                                    for c in p.candidates]
                extra = max(len(c) for c in p.candidates_ids)
            else:
                extra = 0
            p.length = self.generator.check(Request(p.input_ids, p.audios)) + extra
            if p.length > self.generator.buckets[-1]:
                raise ValueError(f"prompt + longest candidate has {p.length} tokens after audio expansion, more "
                                 f"than the largest bucket {self.generator.buckets[-1]}")
        except RequestError as e:
            p.error = e
        except ValueError as e:
            p.error = RequestError("too_long", str(e).removeprefix("request 0: "))

    @staticmethod
    def _load_key(p: _Prepared):
        """Requests with the same key decode the same audio: files (not arrays), segments, root."""
        audio, time, root = p.raw
        if p.error is not None or not audio or any(isinstance(a, np.ndarray) for a in audio):
            return None
        return tuple(str(a) for a in audio), repr(time), str(root), repr(p.audio_ids)

    @staticmethod
    def _follow(p: _Prepared, leader: _Prepared) -> _Prepared:
        """``p`` takes the decoded audio (or the audio error) of an earlier request of its window."""
        p.audios, p.audio_keys, p.error = leader.audios, leader.audio_keys, leader.error
        return p

    def _windows(self, items: list, seed: int, audio_root) -> Iterator[list[_Prepared]]:
        """Windows of prepared requests; the next window's audio decodes while the caller works.
        Within a window each audio file is decoded once: the questions about a song (sent next to
        each other, as a tagger does) share its samples instead of decoding it again each."""
        with ThreadPoolExecutor(self.workers) as pool:
            def submit(start):
                chunk = [self._prepare_text(r, start + i, seed, audio_root)
                         for i, r in enumerate(items[start:start + self.window])]
                leaders, out = {}, []
                for p in chunk:
                    key = self._load_key(p)
                    if key is not None and key in leaders:
                        out.append((p, leaders[key]))
                    else:
                        f = pool.submit(self._load, p)
                        if key is not None:
                            leaders[key] = f
                        out.append((None, f))
                return out

            pending = submit(0) if items else None
            for start in range(0, len(items), self.window):
                current = [f.result() if p is None else self._follow(p, f.result()) for p, f in pending]
                nxt = start + self.window
                pending = submit(nxt) if nxt < len(items) else None
                yield current

    def iter_results(self, requests: Iterable, *, score: bool = False, sampling: SamplingParams | None = None,
                     seed: int = 0, end_token: bool = False, audio_root=None, progress: bool = False,
                     ordered: bool = True, **sampling_kw) -> Iterator[Result]:
        """One :class:`Result` per request, never raising for a bad request: in input order, or with
        ``ordered=False`` as each completes (what a streaming writer wants). With ``score`` each
        request needs ``candidates`` and gets their scores (see :meth:`score`). ``sampling`` (and
        ``sampling_kw``, its fields by name: ``temperature``, ``top_p``, ``max_new_tokens`` ...)
        applies to every request; a request's own ``seed`` (default ``seed``) keys its sampling."""
        from tqdm.auto import tqdm

        items = list(requests)
        sampling = SamplingParams.from_kwargs(sampling, **sampling_kw)
        default_cap = self.generator.max_new_tokens if sampling.max_tokens is None else int(sampling.max_tokens)
        root = self.audio_root if audio_root is None else audio_root
        with tqdm(total=len(items), desc="score" if score else "generate", unit="ans", disable=not progress,
                  dynamic_ncols=True) as bar:
            results = (self._score_results(items, seed, root, end_token) if score else
                       self._generate_results(items, seed, root, default_cap, sampling))
            self._tokens_done = 0
            if not ordered:
                for _, r in results:
                    bar.update(1)
                    if r.token_ids:
                        self._tokens_done += len(r.token_ids)
                        bar.set_postfix_str(f"{self._tokens_done / max(bar.format_dict['elapsed'], 1e-9):.0f} tok/s",
                                            refresh=False)
                    yield r
                return
            held, at = {}, 0
            for index, r in results:
                held[index] = r
                bar.update(1)
                if r.token_ids:
                    self._tokens_done += len(r.token_ids)
                    bar.set_postfix_str(f"{self._tokens_done / max(bar.format_dict['elapsed'], 1e-9):.0f} tok/s",
                                        refresh=False)
                while at in held:
                    yield held.pop(at)
                    at += 1

    def _score_results(self, items, seed, root, end_token):
        for window in self._windows(items, seed, root):
            for p in window:
                self._check(p, True, end_token)
                if p.error is not None:
                    yield p.index, Result(p.id, error=p.error.reason, message=str(p.error))
                    continue
                try:
                    yield p.index, self._score_one(p)
                except ValueError as e:  # the engine's own checks; none expected after _check
                    yield p.index, Result(p.id, error="bad_request", message=str(e))

    def _generate_results(self, items, seed, root, default_cap, sampling: SamplingParams):
        """(input index, Result) as answers complete: the engine pulls requests lazily, so the next
        window's audio decodes on threads while it works; failed requests come out as found."""
        from mufun_jax.generate import Request

        caps = []
        for i, item in enumerate(items):
            try:
                own = parse_request(item, i)["max_new_tokens"]
            except RequestError:
                own = None
            caps.append(default_cap if own is None else own)
        gen = self._generator(max(caps + [1]))
        order, failed = [], collections.deque()

        def feed():
            for window in self._windows(items, seed, root):
                for p in window:
                    self._check(p, False, False)
                    if p.error is not None:
                        failed.append((p.index, Result(p.id, error=p.error.reason, message=str(p.error))))
                        continue
                    order.append(p)
                    yield Request(p.input_ids, p.audios, seed=p.seed, max_new_tokens=caps[p.index],
                                  audio_keys=p.audio_keys)

        for i, o in gen.stream(feed(), sampling, max_new_tokens=max(caps + [1])):
            while failed:
                yield failed.popleft()
            p = order[i]
            ids = [int(t) for t in o.token_ids]
            yield p.index, Result(p.id, text=self.decode(ids, o.finish_reason), token_ids=ids,
                                  logprobs=[float(x) for x in o.logprobs], finish_reason=o.finish_reason)
        while failed:
            yield failed.popleft()

    def _score_one(self, p: _Prepared) -> Result:
        from mufun_jax.generate import Request

        scores = self.generator.score(Request(p.input_ids, p.audios), p.candidates_ids)
        best = max(range(len(scores)), key=lambda j: scores[j].total)
        c = p.candidates[best]
        return Result(p.id, text=c if isinstance(c, str) else self.tokenizer.decode(c, skip_special_tokens=True),
                      candidates=p.candidates, scores=scores)

    # -- public calls ------------------------------------------------------------------------------

    def generate(self, requests: Iterable, *, sampling: SamplingParams | None = None, seed: int = 0,
                 return_details: bool = False, audio_root=None, progress: bool = False, **sampling_kw) -> list:
        """Answer many requests in batches (see :func:`parse_request` for the request forms).
        Returns the answers in input order; a request that cannot be served raises
        :class:`RequestError`. With ``return_details`` it returns :class:`Result` objects instead
        (token ids, log-probs, finish reason) and failed requests carry ``error`` rather than raise.
        A request's ``seed`` (default ``seed``) drives its sampling, so it does not depend on the
        batch it lands in; ``temperature == 0`` is greedy. ``sampling`` and ``sampling_kw`` are as
        in :meth:`iter_results`."""
        results = list(self.iter_results(requests, sampling=sampling, seed=seed, audio_root=audio_root,
                                         progress=progress, **sampling_kw))
        if return_details:
            return results
        for r in results:
            if r.error is not None:
                raise RequestError(r.error, f"request {r.id}: {r.message}")
        return [r.text for r in results]

    def chat(self, prompt: str, audio_files=None, segs=None, max_new_tokens: int = 512, *, seed: int = 0,
             **sampling_kw) -> str:
        """One answer, as the reference ``model.chat(prompt, audio_files, segs)``: ``audio_files`` is
        None, a path (or a 1-D 16 kHz array) or a list of them; ``segs`` is None, ``[start, end]``
        seconds (one audio) or one ``[start, end]`` / None per audio. Greedy unless ``sampling_kw``
        (``temperature``, ``top_p`` ...; see :class:`~mufun_jax.sampling.SamplingParams`) says otherwise."""
        r = self.generate([{"prompt": prompt, "audio": audio_files, "time": segs}], max_new_tokens=max_new_tokens,
                          seed=seed, return_details=True, **sampling_kw)[0]
        if r.error is not None:
            raise RequestError(r.error, r.message)
        return r.text

    def score(self, prompt: str, candidates: Sequence, audio_files=None, segs=None, *, end_token: bool = False):
        """Log-likelihood of each candidate answer after the chat prompt (teacher-forced, one forward
        pass per ``batch_size`` candidates). Returns one :class:`~mufun_jax.generate.ScoreOutput` per
        candidate: ``total`` (sum of log-probs), ``token_logprobs`` and ``mean``. For multiple choice
        (MuCUE style) the most likely option is ``argmax(total)``. A candidate is a string (tokenised
        as it follows ``"ASSISTANT:"`` in training text, i.e. with its leading space) or a list of token
        ids; ``end_token`` appends the template's end token to string candidates."""
        r = next(self.iter_results([{"prompt": prompt, "audio": audio_files, "time": segs,
                                     "candidates": list(candidates)}], score=True, end_token=end_token))
        if r.error is not None:
            raise RequestError(r.error, r.message)
        return r.scores
