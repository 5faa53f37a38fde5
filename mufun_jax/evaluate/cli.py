"""``mufun-eval`` / ``python -m mufun_jax.evaluate``: the command line of the evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mufun_jax.cli import ArgumentParser, DefaultsHelpFormatter, setup_logging

PROG = "mufun-eval"


def _model_specs(models: list[str], adapters: list[str] | None) -> list[tuple[str, str, str | None]]:
    """``[NAME=]PATH`` and the ``--adapter`` list -> (name, path, adapter); names are unique."""
    if adapters and len(adapters) not in (1, len(models)):
        raise ValueError(f"--adapter given {len(adapters)} times for {len(models)} models: give one per model "
                         "(use 'none' for a model without one) or one for all")
    adapters = (adapters * len(models) if adapters and len(adapters) == 1 else adapters) or [None] * len(models)
    out = []
    for spec, ad in zip(models, adapters):
        ad = None if ad in (None, "none") else ad
        name, eq, path = spec.partition("=")
        if not eq:
            path = spec
            name = Path(spec.rstrip("/")).name + (f"+{Path(ad.rstrip('/')).name}" if ad else "")
        out.append((name, path, ad))
    names = [n for n, *_ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"model names {names} repeat: name them NAME=PATH")
    return out


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog=PROG, formatter_class=DefaultsHelpFormatter,
        description="Score MuFun models on MuCUE-format multiple choice as MuCUE-Bench does: the protocol prompt "
        "with the audio, a greedy answer, the chosen letter extracted (regex offline, or an OpenAI-compatible "
        "server with the protocol's message), accuracy per subset and their mean. Writes DIR/answers.jsonl "
        "(resumable: run the same command again), results.json, results.md and results.png. Exit status: 0 all "
        "items answered, 1 some items errored (error records, counted as wrong), 2 a usage error or unusable "
        "input.", epilog="example: mufun-eval converted/mufun-instruct runs/ft/model --data MuCUE/ --out eval/")
    ap.add_argument("models", nargs="+", metavar="MODEL", help="[NAME=]PATH: a converted or PyTorch MuFun directory; "
                    "several run one after the other and are compared")
    ap.add_argument("--data", required=True, help="a save_to_disk DatasetDict directory, parquet/arrow files (one "
                    "split per subset), or MuFun-style JSON/JSONL (docs/evaluating.md)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--subsets", nargs="+", default=None, help="only these subsets (split names)")
    ap.add_argument("--mode", choices=("generate", "likelihood", "both"), default="generate",
                    help="generate: answer and extract; likelihood: argmax of the options' log-likelihood; both")
    ap.add_argument("--extractor", choices=("regex", "openai"), default="regex")
    ap.add_argument("--extractor-url", default=None, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    ap.add_argument("--extractor-model", default=None, help="the served model, e.g. Qwen/Qwen3-8B")
    ap.add_argument("--extractor-api-key", default=None)
    ap.add_argument("--extractor-extra-body", default=None, help="JSON merged into each request (default: "
                    "'{\"chat_template_kwargs\": {\"enable_thinking\": false}}', Qwen3's thinking off)")
    ap.add_argument("--extractor-workers", type=int, default=8, help="concurrent extraction requests")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--template", default="qwen2_instruct", help="chat template (qwen2_instruct or qwen2_base)")
    ap.add_argument("--adapter", action="append", default=None, help="a PEFT LoRA adapter directory merged at load: "
                    "once for all models, or once per model in order ('none' for none)")
    ap.add_argument("--quantize", choices=("none", "int8", "nf4"), default="none")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block", type=int, default=256, help="items handed to the engine at once")
    ap.add_argument("--audio-root", default=None, help="where relative audio paths resolve (then the data directory)")
    ap.add_argument("--shard", default=None, metavar="I/N", help="every N-th item from the I-th, into "
                    "answers.shard-I-of-N.jsonl; then run with --merge")
    ap.add_argument("--merge", action="store_true", help="join the shards' answers and write the reports")
    ap.add_argument("--answers-format", choices=("jsonl", "csv", "parquet"), default="jsonl",
                    help="the answers file: answers.jsonl, answers.csv or answers.parquet (each resumable; shards "
                         "and --merge use jsonl)")
    ap.add_argument("--retry-errors", action="store_true", default=True, help="on resume, ask error items again")
    ap.add_argument("--no-retry-errors", dest="retry_errors", action="store_false")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    from mufun_jax.evaluate import data as data_lib
    from mufun_jax.evaluate import run as run_lib
    from mufun_jax.evaluate.extract import ExtractorError, OpenAIExtractor
    from mufun_jax.outputs import ResultsFileError, parse_shard

    args = build_parser().parse_args(argv)
    try:
        specs = _model_specs(args.models, args.adapter)
        shard = parse_shard(args.shard) if args.shard else None
        for flag, v in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--block", args.block), ("--extractor-workers", args.extractor_workers)):
            if v < 1:
                raise ValueError(f"{flag} {v} must be >= 1")
        extra = None if args.extractor_extra_body is None else json.loads(args.extractor_extra_body)
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"--extractor-extra-body {args.extractor_extra_body!r} must be a JSON object")
        if args.answers_format != "jsonl" and (shard is not None or args.merge):
            raise ValueError(f"--answers-format {args.answers_format}: --shard and --merge use jsonl")
        sources = data_lib.load_subsets(args.data, args.subsets)
    except json.JSONDecodeError as e:
        return _fail(f"--extractor-extra-body is not JSON ({e})")
    except (ValueError, OSError) as e:
        return _fail(str(e))
    data_root = Path(args.data) if Path(args.data).is_dir() else Path(args.data).parent
    setup_logging()
    if args.merge:
        try:
            out = run_lib.merge([n for n, *_ in specs], sources, args.out, args.mode)
        except (ValueError, ResultsFileError, OSError) as e:
            return _fail(str(e))
        return _report(out, args.out)
    extractor = None
    if args.mode != "likelihood" and args.extractor == "openai":
        if not (args.extractor_url and args.extractor_model):
            return _fail("--extractor openai needs --extractor-url and --extractor-model")
        extractor = OpenAIExtractor(args.extractor_url, args.extractor_model, args.extractor_api_key, extra_body=extra)
        try:
            extractor.probe()
        except ExtractorError as e:
            return _fail(str(e))
    elif args.extractor_url or args.extractor_model:
        return _fail("--extractor-url/--extractor-model need --extractor openai")

    def loader(path, adapter):
        def load():
            from mufun_jax.api import MuFun

            return MuFun.from_pretrained(path, dtype=args.dtype, adapter=adapter, template=args.template,
                                         quantize=None if args.quantize == "none" else args.quantize,
                                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        return load

    for name, path, adapter in specs:  # fail before any work on a path that is plainly wrong
        for what, p in (("MODEL", path), ("--adapter", adapter)):
            if p is not None and not Path(p).is_dir():
                return _fail(f"{what} {p}: no such directory")
    settings = run_lib.Settings(mode=args.mode, extractor=extractor, max_new_tokens=args.max_new_tokens,
                                block=args.block, extract_workers=args.extractor_workers,
                                progress=not args.no_progress, audio_root=args.audio_root, data_root=data_root)
    from mufun_jax.torch_files import CheckpointError

    try:
        out = run_lib.evaluate([(n, loader(p, a)) for n, p, a in specs], sources, args.out, settings=settings,
                               shard=shard, retry_errors=args.retry_errors, answers_format=args.answers_format)
    except (ResultsFileError, CheckpointError, OSError) as e:
        return _fail(str(e))
    except ValueError as e:  # duplicate ids, a bad template or setting
        return _fail(str(e))
    return _report(out, args.out)


def _report(out: dict, out_dir) -> int:
    res = out["results"]
    if res is None:
        print(f"{len(out['records'])} answers in {out['path']} ({out['errors']} errors); join the shards with "
              "--merge", file=sys.stderr)
    else:
        for name, m in res["models"].items():
            avg = m["average"]
            print(f"{name}: average accuracy {'—' if avg is None else f'{100 * avg:.1f}%'} over "
                  f"{len(m['subsets'])} subsets", file=sys.stderr)
        print(f"results in {Path(out_dir) / 'results.md'} ({out['errors']} error items)", file=sys.stderr)
    return 1 if out["errors"] else 0


def entry() -> None:
    sys.exit(main())
