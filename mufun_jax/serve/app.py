"""The OpenAI-compatible HTTP surface: ``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/metrics``.

Built on FastAPI; every error is OpenAI's JSON shape with the status the issue tracker agreed on
(400 bad input, 401 key, 404 model, 413 size, 429 queue). A request is read and its audio decoded
on a worker thread, then checked against the engine's limits before it is queued, so a bad request
never reaches the engine loop shared by everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mufun_jax.audio import chunk
from mufun_jax.data.templates import SYSTEM, tokenize_with_audio
from mufun_jax.generate import Request as EngineRequest
from mufun_jax.request import _audio_keys
from mufun_jax.sampling import SamplingParams
from mufun_jax.serve.loop import EngineLoop, Submission
from mufun_jax.serve.messages import AudioPolicy, ChatRequest, DecodedAudio, ServeError, parse_chat
from mufun_jax.serve.metrics import Metrics
from mufun_jax.serve.text import TextStream

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    served_model_name: str = "mufun"
    api_key: str | None = None
    max_queue: int = 64
    max_body_mb: float = 64.0
    audio: AudioPolicy = AudioPolicy()


def create_app(mufun, settings: ServeSettings) -> FastAPI:
    """An app serving ``mufun`` (a :class:`mufun_jax.MuFun`) with one engine loop."""
    gen = mufun.generator
    metrics = Metrics(gen)
    engine = EngineLoop(gen, max_queue=settings.max_queue, metrics=metrics)
    metrics.bind(engine)
    decoded = DecodedAudio()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop(timeout=30)

    app = FastAPI(title="mufun-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.mufun = engine, metrics, mufun

    @app.exception_handler(ServeError)
    async def serve_error(request, e: ServeError):
        metrics.requests.labels(outcome=str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return JSONResponse(ServeError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {settings.api_key}".encode()):
            raise ServeError(401, "a missing or wrong API key (send Authorization: Bearer KEY)",
                             type_="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "mufun-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        limit = int(settings.max_body_mb * (1 << 20))
        if int(request.headers.get("content-length") or 0) > limit:
            raise ServeError(413, f"the body is over --max-body-mb {settings.max_body_mb:g}")
        raw = await request.body()
        if len(raw) > limit:
            raise ServeError(413, f"the body is over --max-body-mb {settings.max_body_mb:g}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServeError(400, f"the body is not JSON: {e}") from None
        if isinstance(body, dict) and body.get("model") not in (None, settings.served_model_name):
            raise ServeError(404, f"the model {body.get('model')!r} does not exist; this server serves "
                                  f"{settings.served_model_name!r}", param="model", code="model_not_found")
        chat, requests, prompt_len = await run_in_threadpool(_prepare, mufun, body, settings, decoded)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        subs = [Submission(r, i, events, loop) for i, r in enumerate(requests)]
        engine.submit(subs)
        meta = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()),
                "model": settings.served_model_name}
        if chat.stream:
            return StreamingResponse(_sse(mufun, engine, metrics, chat, subs, events, meta, prompt_len),
                                     media_type="text/event-stream")
        return JSONResponse(await _complete(request, mufun, engine, metrics, chat, subs, events, meta, prompt_len))

    return app


def _prepare(mufun, body, settings: ServeSettings, decoded: DecodedAudio) -> tuple[ChatRequest, list, int]:
    """Parse, decode the audio, tokenise and check against the engine: on a worker thread."""
    gen = mufun.generator
    chat = parse_chat(body, settings.audio, gen.max_new_tokens, decoded)
    text = mufun.template.render(chat.turns)
    if chat.system is not None:  # the template's fixed system prompt gives way to the client's
        head = SYSTEM + " "
        if not text.startswith(head):
            raise ServeError(400, f"the {mufun.template.name} template has no system prompt", param="messages")
        text = (chat.system + " " if chat.system else "") + text[len(head):]

    ids = tokenize_with_audio(text, mufun.tokenizer)
    n_tags = sum(1 for t in ids if t < 0)
    if n_tags != len(chat.audios):
        raise ServeError(400, f"the messages have {n_tags} <audio> tags for {len(chat.audios)} audio parts",
                         param="messages")
    audios = [chunk(x) for x in chat.audios]
    keys = _audio_keys(audios, None, None)
    stops = list(mufun.stop_ids)
    requests = []
    for i in range(chat.n):
        sp = SamplingParams.from_kwargs(**{"stop_token_ids": stops, **chat.sampling,
                                           "seed": chat.sampling["seed"] + i})
        requests.append(EngineRequest(ids, audios, audio_keys=keys, sampling=sp))
    try:
        prompt_len = gen.check(requests[0])
    except ValueError as e:
        raise ServeError(400, str(e).removeprefix("request 0: "), param="messages") from None
    return chat, requests, prompt_len


def _logprob_entries(tokenizer, ids, lps) -> list[dict]:
    out = []
    for t, lp in zip(ids, lps):
        s = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(int(t))])
        out.append({"token": s, "logprob": float(lp), "bytes": list(s.encode()), "top_logprobs": []})
    return out


async def _complete(request, mufun, engine, metrics, chat, subs, events, meta, prompt_len) -> dict:
    streams = [TextStream(mufun, chat.stop) for _ in subs]
    done, choices = 0, [None] * len(subs)
    try:
        while done < len(subs):
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(subs)
                    metrics.requests.labels(outcome="aborted").inc()
                    return {}
                continue
            i, kind = ev[0], ev[1]
            ts = streams[i]
            if kind == "tokens":
                ts.add(ev[2], ev[3])
                if ts.stopped and not ts.finished:
                    engine.cancel([subs[i]])
                continue
            if kind == "error":
                raise ServeError(500, f"the engine failed on this request: {ev[2]}", type_="server_error")
            out = ev[2]
            if ts.finished:  # a second "done" cannot come; guard anyway
                continue
            ts.finish(out.finish_reason)
            choices[i] = {"index": i, "message": {"role": "assistant", "content": ts.text},
                          "logprobs": ({"content": _logprob_entries(mufun.tokenizer, ts.ids, ts.logprobs)}
                                       if chat.logprobs else None),
                          "finish_reason": ts.reason}
            done += 1
    except ServeError:
        engine.cancel(subs)
        raise
    except Exception as e:  # a failure in this request's own handling fails it alone
        engine.cancel(subs)
        log.exception("request %s failed", meta["id"])
        raise ServeError(500, f"this request failed: {type(e).__name__}: {e}", type_="server_error") from None
    completion = sum(len(ts.ids) for ts in streams)
    metrics.requests.labels(outcome="200").inc()
    return {**meta, "object": "chat.completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion,
                      "total_tokens": prompt_len + completion}}


async def _sse(mufun, engine, metrics, chat, subs, events, meta, prompt_len):
    """Server-sent events in OpenAI's chunk format, ending with ``[DONE]``."""
    streams = [TextStream(mufun, chat.stop) for _ in subs]
    chunk = lambda choices, **kw: "data: " + json.dumps({**meta, "object": "chat.completion.chunk",
                                                         "choices": choices, **kw}) + "\n\n"
    done = 0
    try:
        for i in range(len(subs)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        while done < len(subs):
            ev = await events.get()
            i, kind = ev[0], ev[1]
            ts = streams[i]
            if ts.finished:
                continue
            if kind == "error":
                yield "data: " + json.dumps(ServeError(500, f"the engine failed on this request: {ev[2]}",
                                                       type_="server_error").body()) + "\n\n"
                done += 1
                continue
            if kind == "tokens":
                delta, new = ts.add(ev[2], ev[3])
                if ts.stopped:
                    engine.cancel([subs[i]])
                    delta += ts.finish("stop")
                    done += 1
            else:
                delta, new = ts.finish(ev[2].finish_reason), ts.take_new()
                done += 1
            if delta or ts.finished:
                lp = ({"content": _logprob_entries(mufun.tokenizer, *new)} if chat.logprobs and new else None)
                yield chunk([{"index": i, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                              "finish_reason": ts.reason if ts.finished else None}])
        if chat.include_usage:
            completion = sum(len(ts.ids) for ts in streams)
            yield chunk([], usage={"prompt_tokens": prompt_len, "completion_tokens": completion,
                                   "total_tokens": prompt_len + completion})
        yield "data: [DONE]\n\n"
        metrics.requests.labels(outcome="200").inc()
    finally:
        if done < len(subs):  # the client went away (or this generator failed): free the slots
            engine.cancel(subs)
            metrics.requests.labels(outcome="aborted").inc()
