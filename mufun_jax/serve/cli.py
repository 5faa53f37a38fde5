"""``mufun-serve MODEL``: load a model and serve it over HTTP (OpenAI's chat completions API).

Binds 127.0.0.1 by default. A key comes from ``--api-key`` or ``MUFUN_API_KEY``; serving beyond
loopback without one is refused. SIGTERM stops accepting connections, lets the requests in flight
finish (up to ``--drain-seconds``) and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path

from mufun_jax.cli_base import ArgumentParser, DefaultsHelpFormatter, add_common, invoked_as, run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog=invoked_as("mufun-serve"), formatter_class=DefaultsHelpFormatter,
                        description="An OpenAI-compatible chat server (POST /v1/chat/completions with input_audio "
                                    "or audio_url parts, streaming; GET /v1/models, /health, /metrics) on the "
                                    "continuous-batching engine: concurrent requests share one batch.",
                        epilog="example: mufun-serve converted/mufun-instruct --port 8000 --api-key $KEY")
    ap.add_argument("model", metavar="MODEL", help="a converted model directory or a PyTorch MuFun directory")
    ap.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory, merged at load")
    ap.add_argument("--mesh", default="1,1,-1", metavar="DATA,FSDP,TENSOR",
                    help="this host's devices: weights sharded as in training, the KV cache over tensor and data")
    ap.add_argument("--quantize", choices=("none", "int8", "nf4"), default="none", help="weight-only quantisation")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype (default: float32 on CPU, bfloat16 on TPU/GPU)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None, help="required as 'Authorization: Bearer KEY' (default: "
                                                    "$MUFUN_API_KEY; none on loopback if neither is set)")
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL's name)")
    ap.add_argument("--batch-size", type=int, default=8, help="decode slots: requests answered together")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="the largest max_tokens a request may ask for")
    ap.add_argument("--decode-steps", type=int, default=8, help="tokens per device call: a stream's granularity, "
                                                                "and how soon a departed client's slot frees")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    ap.add_argument("--max-body-mb", type=float, default=64.0, help="larger bodies get 413")
    ap.add_argument("--max-audio-seconds", type=float, default=600.0, help="longer audio gets 413")
    ap.add_argument("--allowed-audio-dir", default=None, help="file:// audio URLs must lie under this directory "
                                                              "(default: file:// URLs are refused)")
    ap.add_argument("--allow-remote-audio", action="store_true", help="fetch http(s) audio URLs")
    ap.add_argument("--drain-seconds", type=float, default=30.0, help="on SIGTERM, how long requests in flight "
                                                                      "may take to finish")
    add_common(ap, progress=False)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    return run_cli(ap.prog, lambda: _serve(ap, args), args.debug)


def _serve(ap, args) -> int:
    import uvicorn

    from mufun_jax.api import MuFun
    from mufun_jax.serve import AudioPolicy, ServeSettings, create_app
    from mufun_jax.sharding import mesh_from_flag

    bad = [f"{flag} {v} must be {why}" for flag, v, ok, why in (
        ("--port", args.port, 0 <= args.port < 65536, "a port number"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
        ("--decode-steps", args.decode_steps, args.decode_steps >= 1, ">= 1"),
        ("--max-queue", args.max_queue, args.max_queue >= 0, ">= 0"),
        ("--max-body-mb", args.max_body_mb, args.max_body_mb > 0, "> 0"),
        ("--max-audio-seconds", args.max_audio_seconds, args.max_audio_seconds > 0, "> 0"),
        ("--drain-seconds", args.drain_seconds, args.drain_seconds >= 0, ">= 0")) if not ok]
    allowed = Path(args.allowed_audio_dir) if args.allowed_audio_dir else None
    if allowed is not None and not allowed.is_dir():
        bad.append(f"--allowed-audio-dir {allowed} is not a directory")
    key = args.api_key or os.environ.get("MUFUN_API_KEY") or None
    if key is None and not _loopback(args.host):
        bad.append(f"--host {args.host} serves beyond this machine: give --api-key (or MUFUN_API_KEY)")
    try:
        mesh = mesh_from_flag(args.mesh)
    except ValueError as e:
        bad.append(str(e))
    if bad:
        ap.error("; ".join(bad))
    setup_logging()
    log = logging.getLogger("mufun_jax.serve")
    mufun = MuFun.from_pretrained(args.model, dtype=args.dtype, adapter=args.adapter, mesh=mesh,
                                  quantize=None if args.quantize == "none" else args.quantize,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  decode_steps=args.decode_steps)
    settings = ServeSettings(served_model_name=args.served_model_name or Path(args.model).resolve().name,
                             api_key=key, max_queue=args.max_queue, max_body_mb=args.max_body_mb,
                             audio=AudioPolicy(max_seconds=args.max_audio_seconds, allowed_dir=allowed,
                                               allow_remote=args.allow_remote_audio))
    if key is None:
        log.warning("no API key: anyone on this machine can use the server")
    config = uvicorn.Config(create_app(mufun, settings), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_seconds)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has drained; a no-op handler makes that a clean exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"mufun-serve: serving {settings.served_model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
    server.run()
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
