"""``infer.py`` / ``mufun-infer``: batched answers (or scores) for a file of requests, written as
each completes, resumable. A thin front end over :meth:`mufun_jax.MuFun.iter_results` and the
output writers (:mod:`mufun_jax.outputs`); the shared CLI conventions live in :mod:`mufun_jax.cli`."""

from __future__ import annotations

import argparse
import sys

from mufun_jax.cli_base import (ArgumentParser, DefaultsHelpFormatter, add_common, exit_with, invoked_as, run_cli,
                                setup_logging)
from mufun_jax.compile_cache import enable_compile_cache
from mufun_jax.errors import EXIT_PREEMPTED

# infer.py's flags that are SamplingParams fields (by name; max_new_tokens is HF's name for max_tokens)
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def _read_requests(path) -> list:
    """Records of a JSON list or a JSONL file. A JSONL line that does not parse becomes a
    ``_BadLine`` (reported as an error record); a broken JSON list is a usage error (ValueError)."""
    import json
    from pathlib import Path

    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON list ({e.msg} at line {e.lineno}, column {e.colno})") from e
        return records
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(_BadLine(f"{Path(path).name}:{n}", f"invalid JSON ({e.msg})"))
    return records


class _BadLine:
    def __init__(self, id, message):
        self.id, self.message = id, message


def infer_main(argv=None) -> int:
    """Answer (or, with ``--score``, rank candidates for) every request of a JSON / JSONL file,
    streaming each result to the output as it completes (resumable, see mufun_jax/outputs.py)."""
    ap = ArgumentParser(
        prog=invoked_as("infer.py", "mufun-infer"),
        description="Batched MuFun inference: one JSONL result per request, written as it "
        "completes; run the same command again to resume an interrupted run (done ids are skipped). "
        "Requests are training-schema records ({id, audio, time, conversations}; the first human turn is the "
        "prompt) or {id, prompt, audio, time}, with optional candidates for --score. Exit status: 0 all answered, "
        "1 some requests failed (error records in the output), 2 a usage error or an unusable model, input or "
        "output file (nothing is written), 75 stopped by SIGTERM (run it again to finish).",
        epilog="example: python infer.py converted/mufun-instruct requests.jsonl --output answers.jsonl "
               "--audio-root data/ --batch-size 16",
        usage="%(prog)s MODEL INPUT --output OUT [options]\n       %(prog)s --compile-only --topology SLICE [MODEL] "
              "[options]", formatter_class=DefaultsHelpFormatter)
    ap.add_argument("model", nargs="?", metavar="MODEL", help="a converted directory (convert_weights.py import, or train.py's "
                                             "OUTPUT_DIR/model) or a PyTorch MuFun checkpoint directory")
    ap.add_argument("input", nargs="?", metavar="INPUT", help="requests, as a JSON list or JSONL")
    ap.add_argument("--output", "-o", help="results, resumable: .jsonl (a line per request as it completes), .csv "
                    "or .parquet (written whole at the end of the run)")
    ap.add_argument("--batch-size", type=int, default=8, help="decode slots: requests answered together")
    ap.add_argument("--prefill-batch", type=int, default=4, help="prompts prefilled together as slots free up "
                    "(at most --batch-size; default 4): bounds the prefill's memory, as in --compile-only")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="prefill attention in pieces of this many "
                    "tokens (must divide the prompt buckets above it): bounds long prompts' memory")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this probability mass")
    ap.add_argument("--min-p", type=float, default=None, help="drop tokens below this fraction of the top one's "
                                                              "probability (0 = off)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of requests without their own 'seed'")
    ap.add_argument("--score", action="store_true", help="score each request's 'candidates' instead of generating; "
                                                         "the answer is the most likely candidate")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute and parameter dtype (default: float32 on CPU, bfloat16 on TPU/GPU)")
    ap.add_argument("--attention-impl", default="auto", help="attention backend of scoring (auto: by platform)")
    ap.add_argument("--mesh", default="1,1,-1", metavar="DATA,FSDP,TENSOR", help="this host's devices: weights "
                    "sharded as in training, the KV cache's kv heads over tensor, slots over data (hosts: --shard)")
    ap.add_argument("--quantize", choices=("none", "int8", "nf4"), default="none",
                    help="weight-only quantisation of every linear layer and the embedding (int8: about half the "
                         "bytes of bf16)")
    ap.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory (convert_weights.py "
                                                     "export-adapter), merged into MODEL's weights at load")
    ap.add_argument("--audio-root", default=None, help="directory that relative audio paths are resolved against")
    add_common(ap)
    ap.add_argument("--shard", default=None, metavar="I/N", help="this host's part of the requests: every N-th "
                    "from the I-th, written to OUTPUT.shard-I-of-N.jsonl (default under jax.distributed: this "
                    "process's index and the process count)")
    ap.add_argument("--sort", action="store_true", help="at the end, rewrite the output in input order (results "
                    "are written as they complete)")
    ap.add_argument("--retry-errors", action=argparse.BooleanOptionalAction, default=True,
                    help="on resume, answer again the requests whose earlier result is an error record (fixed "
                         "audio, a corrected --audio-root, ...); --no-retry-errors keeps them as they are")
    tpu = ap.add_argument_group("compile only", "AOT-compile the prefill and one decode step for a TPU slice on this "
                                "host (needs libtpu: pip install -e .[tpu]); MODEL and INPUT are not needed (MODEL, "
                                "when given and present, supplies the config; else the mufun-8b preset)")
    tpu.add_argument("--compile-only", action="store_true")
    tpu.add_argument("--topology", default=None, help="v5p-128, v6e-64, v6e-8, v5e-256, ...")
    tpu.add_argument("--num-slices", type=int, default=1)
    tpu.add_argument("--context", type=int, default=4096, help="prompt tokens per row (audio included)")
    args = ap.parse_args(argv)
    if not (args.compile_only or args.topology):  # as in train_main: no cache for TPU compiles on a CPU host
        enable_compile_cache()
    return run_cli(ap.prog, lambda: _infer(ap, args), args.debug)


def _infer(ap, args) -> int:
    import json
    from pathlib import Path

    from mufun_jax.outputs import ResultsFileError, open_results, parse_shard, shard_path

    if args.prefill_batch < 1 or (args.prefill_chunk is not None and args.prefill_chunk < 1):
        ap.error(f"--prefill-batch {args.prefill_batch} and --prefill-chunk {args.prefill_chunk} must be >= 1")
    prefill_batch = min(args.prefill_batch, max(args.batch_size, 1))
    if args.compile_only or args.topology is not None:
        if not (args.compile_only and args.topology):
            ap.error("--compile-only and --topology go together")
        from mufun_jax.aot.drivers import infer_compile_only

        try:
            mesh_shape = [int(x) for x in args.mesh.split(",")]
        except ValueError:
            mesh_shape = []
        if len(mesh_shape) != 3:
            ap.error(f"--mesh {args.mesh!r} must be three sizes DATA,FSDP,TENSOR (one may be -1)")
        return infer_compile_only(args.topology, batch=args.batch_size, context=args.context, mesh_shape=mesh_shape,
                                  new_tokens=args.max_new_tokens, model=args.model, num_slices=args.num_slices,
                                  prefill_chunk=args.prefill_chunk, prefill_batch=prefill_batch,
                                  quantize=None if args.quantize == "none" else args.quantize)
    if args.input is None or args.output is None:
        ap.error("MODEL, INPUT and --output are required (except with --compile-only)")
    bad = [f"{name} {value} {why}" for name, value, cond, why in (
        ("--batch-size", args.batch_size, args.batch_size < 1, "must be >= 1"),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens < 1, "must be >= 1"),
    ) if cond]
    from mufun_jax.sampling import SamplingParams  # jax: cli.py imports it lazily so --help stays instant

    try:
        sampling = SamplingParams.from_kwargs(**{k: getattr(args, k) for k in SAMPLING_FLAGS})
    except ValueError as e:
        bad.append(str(e))
    if bad:
        ap.print_usage(sys.stderr)
        print(f"infer.py: error: {'; '.join(bad)}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's per-restore TensorStore notices
    except ImportError:
        pass
    try:
        records = _read_requests(args.input)
        shard = parse_shard(args.shard) if args.shard else None
    except (OSError, ValueError) as e:
        print(f"infer.py: error: cannot read requests: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"infer.py: error: {args.input}: no requests in the file; nothing to do, no output written",
              file=sys.stderr)
        return 2
    items = []  # (id, record): every record gets an explicit id (its position when it has none)
    for i, r in enumerate(records):
        if isinstance(r, _BadLine):
            items.append((r.id, r))
        else:
            rec = {"prompt": r} if isinstance(r, str) else r
            rid = rec.get("id", i) if isinstance(rec, dict) else i
            items.append((rid, dict(rec, id=rid) if isinstance(rec, dict) else rec))
    seen, dups = set(), []
    for rid, _ in items:
        key = json.dumps(rid, sort_keys=True)
        if key in seen:
            dups.append(rid)
        seen.add(key)
    if dups:
        print(f"infer.py: error: duplicate request ids {dups[:10]}{' ...' if len(dups) > 10 else ''}: ids must be "
              "unique (results are matched and resumed by id)", file=sys.stderr)
        return 2
    out = Path(args.output)
    if not out.parent.is_dir():
        print(f"infer.py: error: {out.parent}: no such directory for --output", file=sys.stderr)
        return 2

    from mufun_jax.train_lib import maybe_initialize_distributed

    maybe_initialize_distributed(None)
    import jax

    if shard is None and jax.process_count() > 1:
        shard = (jax.process_index(), jax.process_count())
    mine = [it for p, it in enumerate(items) if shard is None or p % shard[1] == shard[0]]
    try:
        results_file = open_results(shard_path(out, shard), retry_errors=args.retry_errors)  # suffix: the format
    except (ResultsFileError, OSError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    todo = [it for it in mine if it[0] not in results_file]
    if len(todo) < len(mine) or results_file.retried:
        print(f"resuming {results_file.path}: {len(mine) - len(todo)} of {len(mine)} requests already done"
              + (f"; answering the {len(results_file.retried)} earlier error records again (--no-retry-errors "
                 "keeps them)" if results_file.retried else ""), file=sys.stderr)

    from mufun_jax.api import MuFun, Result
    from mufun_jax.preemption import GracefulStop
    from mufun_jax.torch_files import CheckpointError

    failed: dict[str, int] = {}
    model = None
    stop = GracefulStop()
    try:
        if any(not isinstance(r, _BadLine) for _, r in todo):
            try:
                from mufun_jax.sharding import mesh_from_flag

                model = MuFun.from_pretrained(args.model, dtype=args.dtype, attention_impl=args.attention_impl,
                                              mesh=mesh_from_flag(args.mesh),
                                              quantize=None if args.quantize == "none" else args.quantize,
                                              adapter=args.adapter, batch_size=args.batch_size,
                                              max_new_tokens=args.max_new_tokens, prefill_batch=prefill_batch,
                                              prefill_chunk=args.prefill_chunk)
            except (CheckpointError, OSError) as e:
                print(f"infer.py: error: cannot load the model: {e}", file=sys.stderr)
                return 2
            except ValueError as e:  # a bad setting (e.g. --prefill-chunk against the buckets) or config
                print(f"infer.py: error: {e}", file=sys.stderr)
                return 2
            good = [r for _, r in todo if not isinstance(r, _BadLine)]
            results = model.iter_results(good, score=args.score, sampling=sampling, seed=args.seed, audio_root=args.audio_root, progress=not args.no_progress,
                                         ordered=False)
        else:
            results = iter(())
        for rid, r in todo:
            if isinstance(r, _BadLine):
                results_file.write(Result(rid, error="malformed_record", message=r.message).to_json())
                failed["malformed_record"] = failed.get("malformed_record", 0) + 1
        with stop:
            for r in results:
                results_file.write(r.to_json())
                if r.error is not None:
                    failed[r.error] = failed.get(r.error, 0) + 1
                if stop.requested:
                    results.close()  # ends the engine and the audio threads; in-flight requests are dropped
                    break
    finally:
        results_file.close()
    n_done = sum(1 for rid, _ in mine if rid in results_file)
    if stop.requested:
        print(f"infer.py: stopped by {stop.requested}: {n_done} of {len(mine)} requests are in "
              f"{results_file.path}; run the same command again to finish", file=sys.stderr)
        return EXIT_PREEMPTED
    if args.sort:
        results_file.sort(rid for rid, _ in mine)
    if model is not None:
        print("caches: " + "; ".join(
            f"{name} {st['reused']} of {st['used']} reused" + (f" ({st['reused'] / st['used']:.0%})" if st["used"] else "")
            for name, st in model.cache_stats().items()), file=sys.stderr)
    n_failed = sum(failed.values())
    print(f"{len(todo) - n_failed} of {len(todo)} requests answered in this run ({n_done} of {len(mine)} in all); "
          f"results in {results_file.path}"
          + (f"; failed: {', '.join(f'{k} {v}' for k, v in sorted(failed.items()))}" if failed else ""),
          file=sys.stderr)
    return 1 if n_failed else 0

def infer_entry() -> None:
    """``infer.py`` / ``mufun-infer`` as a program (see :func:`mufun_jax.cli_base.exit_with`)."""
    exit_with(infer_main())
