"""Command-line front ends (``train.py`` / ``mufun-train``, ``infer.py`` / ``mufun-infer``,
``convert_weights.py`` / ``mufun-convert``, ``mufun-plot``); the work is in the library modules.

Every CLI takes ``--kebab-case`` flags; the ``--snake_case`` spellings of earlier versions are
still accepted as hidden aliases (:class:`ArgumentParser`). Every CLI runs its work through
:func:`run_cli`, so an expected failure (a missing file, bad YAML, a bad value, a corrupt
checkpoint) ends in one line that names the problem, with exit status 2, and a traceback only
with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from mufun_jax.compile_cache import enable_compile_cache
from mufun_jax.errors import EXIT_PREEMPTED

# infer.py's flags that are SamplingParams fields (by name; max_new_tokens is HF's name for max_tokens)
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "max_new_tokens")

EXIT_USAGE = 2  # bad input: the one-line error of run_cli, argparse's usage errors


def invoked_as(*names: str) -> str:
    """The program name for usage lines and errors: the name this process was started as when it is
    one of ``names`` (``mufun-train`` and ``train.py`` are the same CLI), else ``names[0]`` (e.g.
    in-process calls from tests, where ``sys.argv[0]`` is pytest)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in names else names[0]


def one_line(e: BaseException) -> str:
    """An exception as one line: OSErrors as ``PATH: reason``, multi-line messages (YAML's
    marks, Orbax's shape dumps) joined, very long ones cut."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    else:
        text = str(e) or type(e).__name__
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= 2000 else text[:2000] + " ..."


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that are the input's fault, not a bug: I/O errors, bad YAML, bad values (InputError
    and CheckpointError are ValueErrors), corrupt JSON (a ValueError too)."""
    import yaml

    from mufun_jax.errors import InputError
    from mufun_jax.torch_files import CheckpointError

    return (OSError, yaml.YAMLError, ValueError, InputError, CheckpointError)


def run_cli(prog: str, main: Callable[[], int], debug: bool) -> int:
    """Run a CLI's ``main`` and return its exit status. An expected failure (:func:`expected_errors`)
    becomes ``PROG: error: MESSAGE`` on stderr and status 2, instead of a traceback that hides the
    one line that matters; with ``debug`` it propagates, traceback and all. Anything else (a bug)
    always propagates."""
    try:
        return main()
    except expected_errors() as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with one flag style: a ``--snake_case`` spelling of a known ``--kebab-case``
    option is read as that option, without showing up in ``--help``."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        known = {o for a in self._actions for o in a.option_strings}
        for sp in self._subparsers._group_actions if self._subparsers else ():
            for p in sp.choices.values():
                known |= {o for a in p._actions for o in a.option_strings}
        out = []
        for a in args:
            name, eq, value = str(a).partition("=")
            if name.startswith("--") and "_" in name and name.replace("_", "-") in known:
                a = name.replace("_", "-") + eq + value
            out.append(a)
        return super().parse_known_args(out, namespace)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows each option's default in ``--help`` where it has one worth showing (not None/False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and "default" not in text):
            text += " (default: %(default)s)"
        return text


def add_common(ap: argparse.ArgumentParser, progress: bool = True) -> None:
    """The flags every CLI shares: ``--debug`` and (where there is a bar) ``--no-progress``."""
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    if progress:
        ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def setup_logging() -> None:
    """Our INFO lines; warnings only from other libraries (Orbax logs every file at INFO)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mufun_jax").setLevel(logging.INFO)  # ours, without Orbax's per-file INFO lines
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def train_main(argv=None) -> int:
    """Train or resume MuFun from a YAML config with ``key=value`` overrides."""
    ap = ArgumentParser(
        prog=invoked_as("train.py", "mufun-train"),
        description="Train MuFun (resumes from the newest checkpoint in output_dir, if its model and trainable "
                    "modules match the config). Exit status: 0 done, 2 bad input (one line names it), 3 the loss "
                    f"became NaN/inf, {EXIT_PREEMPTED} preempted after saving (run the same command again).",
        epilog="example: python train.py --config configs/demo.yaml max_steps=50 optim.lr=1e-3 mesh.fsdp=-1")
    ap.add_argument("--config", required=True, help="YAML training config (see configs/)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.batch_size=16")
    ap.add_argument("--profile", action="store_true", help="write a jax.profiler trace of steps 3-5 to "
                                                           "OUTPUT_DIR/profile (open it with TensorBoard or Perfetto)")
    ap.add_argument("--force", action="store_true", help="resume OUTPUT_DIR's checkpoints even though the saved "
                    "model or trainable modules differ from the config (default: refuse, naming the differences)")
    ap.add_argument("--compile-only", action="store_true", help="compile the train step for --topology on this "
                    "host (needs libtpu, no TPU), print per-chip memory and FLOPs; exit 1 if it does not fit")
    ap.add_argument("--topology", default=None, help="TPU slice for --compile-only: v5p-128, v6e-64, v5e-256, ...")
    ap.add_argument("--num-slices", type=int, default=1, help="slices of a multi-slice job (--compile-only)")
    add_common(ap)
    args = ap.parse_intermixed_args(argv)  # KEY=VALUE overrides before and after flags alike
    if args.compile_only != (args.topology is not None):
        ap.error("--compile-only and --topology go together")
    setup_logging()
    if not args.compile_only:  # XLA:TPU programs compiled without a TPU cannot be read back from the cache
        enable_compile_cache()
    return run_cli(ap.prog, lambda: _train(ap.prog, args), args.debug)


def _train(prog: str, args) -> int:
    from mufun_jax.train_config import TrainConfig
    from mufun_jax.train_lib import NonFiniteLossError, train

    cfg = TrainConfig.load(args.config, args.overrides)
    if args.no_progress:
        cfg.progress = False
    if args.compile_only:
        from mufun_jax.aot.drivers import train_compile_only

        try:
            return train_compile_only(cfg, args.topology, num_slices=args.num_slices)
        except RuntimeError as e:
            raise ValueError(str(e)) from e
    try:
        if cfg.recipe == "grpo":  # hand-off: GRPO has its own loop (mufun_jax/grpo/trainer.py)
            from mufun_jax.grpo.trainer import train
        result = train(cfg, profile=args.profile, force=args.force)
        if result.get("preempted"):
            return EXIT_PREEMPTED
    except NonFiniteLossError as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 3
    print(f"done at step {result['step']}: loss {result.get('loss', float('nan')):.4f}"
          + (f", eval loss {result['eval_loss']:.4f}" if "eval_loss" in result else "")
          + f"; model written to {cfg.output_dir}/model")
    return 0


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
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of requests without their own 'seed'")
    ap.add_argument("--score", action="store_true", help="score each request's 'candidates' instead of generating; "
                                                         "the answer is the most likely candidate")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute and parameter dtype (default: float32 on CPU, bfloat16 on TPU/GPU)")
    ap.add_argument("--attention-impl", default="auto", help="attention backend of scoring (auto: by platform)")
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

        return infer_compile_only(args.topology, batch=args.batch_size, context=args.context,
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
                model = MuFun.from_pretrained(args.model, dtype=args.dtype, attention_impl=args.attention_impl,
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
    """``infer.py`` / ``mufun-infer`` as a program. On rc 2 nothing was written, so the process ends
    without the interpreter's teardown: after a damaged checkpoint, Orbax's abandoned reads would
    otherwise print hundreds of lines of tracebacks below the one-line error."""
    rc = infer_main()
    if rc == 2:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(rc)


CONVERT_HELP = """Convert MuFun weights between PyTorch checkpoints and this project's model directory.

  import SRC DST                       released combined checkpoint, or MuFun's per-component folders
  import --whisper W --qwen3 Q --connector blp_4i_2x DST
                                       plain HF Whisper + Qwen3 checkpoints, connector initialised from --seed
  export SRC DST                       back to the combined HF layout (sharded safetensors + index)
  export-adapter RUN DST [--merge]     a LoRA training run's newest checkpoint as a PEFT adapter (HF module
                                       names), or with --merge the whole model in the combined HF layout
"""


def convert_main(argv=None) -> int:
    """``convert_weights.py`` / ``mufun-convert``."""
    ap = ArgumentParser(prog=invoked_as("convert_weights.py", "mufun-convert"), description=CONVERT_HELP,
                        epilog="exit status: 0 written, 2 bad input (one line names it; nothing is left at DST)",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="PyTorch checkpoint -> model directory")
    imp.add_argument("paths", nargs="+", metavar="PATH", help="SRC DST, or only DST with --whisper/--qwen3")
    imp.add_argument("--whisper", help="HF Whisper folder (WhisperForConditionalGeneration or WhisperModel); "
                                       "the decoder is dropped")
    imp.add_argument("--qwen3", help="HF Qwen3ForCausalLM folder")
    imp.add_argument("--connector", help="connector type for a fresh connector, e.g. blp_4i_2x")
    imp.add_argument("--taps", type=lambda v: [int(x) for x in v.split(",")], default=None,
                     help="Whisper hidden-state taps for a fresh model, comma separated (default 0,7,15,32, "
                          "MuFun's; set it for encoders that are not 32 layers deep)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the fresh connector's initialisation (default 0)")
    exp = sub.add_parser("export", help="model directory -> combined HF layout (safetensors)")
    exp.add_argument("paths", nargs=2, metavar="PATH", help="SRC DST")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5 GB)")
    ada = sub.add_parser("export-adapter", help="LoRA training run -> PEFT adapter (or, --merge, merged HF layout)")
    ada.add_argument("paths", nargs=2, metavar="PATH", help="RUN (train.py's output_dir) DST")
    ada.add_argument("--merge", action="store_true", help="merge the adapters into the base model (init_from) and "
                     "write the whole model in the combined HF layout, fully trained modules included")
    ada.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard with --merge")
    for p in (imp, exp, ada):
        p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16"],
                       help="dtype of the written weights (default: keep the source's)")
        p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        add_common(p)
    args = ap.parse_args(argv)
    if args.cmd == "import" and len(args.paths) != (1 if (args.whisper or args.qwen3) else 2):
        ap.error("import takes SRC DST, or DST alone with --whisper, --qwen3 and --connector")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("mufun_jax").setLevel(logging.INFO)  # ours, without Orbax's per-read INFO lines
    return run_cli(f"{ap.prog} {args.cmd}", lambda: _convert(args), args.debug)


def _convert(args) -> int:
    from mufun_jax.weights import export_checkpoint, import_checkpoint

    if args.cmd == "import":
        src, dst = (None, args.paths[0]) if (args.whisper or args.qwen3) else args.paths
        import_checkpoint(dst, src, whisper=args.whisper, qwen3=args.qwen3, connector_type=args.connector,
                          taps=args.taps, seed=args.seed, dtype=args.dtype, overwrite=args.overwrite,
                          progress=not args.no_progress)
    elif args.cmd == "export":
        export_checkpoint(*args.paths, dtype=args.dtype, max_shard_gb=args.max_shard_gb,
                          overwrite=args.overwrite, progress=not args.no_progress)
    else:
        from mufun_jax.peft_format import export_adapter

        export_adapter(*args.paths, merge=args.merge, dtype=args.dtype, max_shard_gb=args.max_shard_gb,
                       overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def plot_main(argv=None) -> int:
    """``mufun-plot RUN_DIR [RUN_DIR ...]``: the loss curves of training runs, as one PNG."""
    ap = ArgumentParser(prog="mufun-plot", description="Plot the train and eval loss of train.py runs from their "
                        "metrics.jsonl; several runs (e.g. two stages) follow each other on one step axis.",
                        epilog="exit status: 0 written, 2 bad input (a run without metrics: nothing is written)")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py output_dir(s)")
    ap.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/loss.png of the last run)")
    add_common(ap, progress=False)
    args = ap.parse_args(argv)
    return run_cli(ap.prog, lambda: _plot(args), args.debug)


def _plot(args) -> int:
    from pathlib import Path

    from mufun_jax.metrics import plot_runs

    out = plot_runs(args.runs, args.out or Path(args.runs[-1]) / "loss.png")
    print(f"wrote {out}")
    return 0
