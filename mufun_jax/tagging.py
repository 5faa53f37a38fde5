"""``mufun-tag``: tag and transcribe a music library into training data for music generators.

    mufun-tag MODEL DIR [--preset acestep|tags|FILE.yaml] [--format acestep|caption|jsonl|csv|hf] [--out PATH]

It walks DIR for audio in the front end's formats (:data:`AUDIO_EXTS`), asks every song the
preset's questions (:mod:`mufun_jax.tag_answers`), turns the answers into a tag string and lyrics,
and writes them in one of the layouts that dataset tools read (:mod:`mufun_jax.tag_formats`).

Why it is fast: all the questions are sent to one :meth:`MuFun.iter_results` stream, a song's
questions next to each other, so the engine encodes each song once, prefills its prompt prefix
(system prompt and audio) once for all its questions, and keeps every decode slot busy across
songs. Answers arrive as they complete and are grouped per song; a song is written as soon as its
last answer is in.

Why it can be stopped at any time: a song's outputs are written atomically once it is complete,
and a song whose outputs exist is skipped by the next run (``--overwrite`` redoes it). A song that
fails (unreadable audio, an answer that cannot be parsed) writes nothing, is counted by reason,
listed with its raw answers in the failures file, and tried again by the next run.

Exit status: 0 every song tagged, 1 some songs failed, 2 a usage error or unusable input (one
line, nothing written), 75 stopped by SIGTERM (run the same command again to finish).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import zlib
from pathlib import Path

from mufun_jax import tag_formats
from mufun_jax.audio import AV_EXTS, SOUNDFILE_EXTS
from mufun_jax.errors import EXIT_PREEMPTED, InputError
from mufun_jax.tag_answers import Preset, TagFailure, build_record, load_preset

log = logging.getLogger(__name__)

AUDIO_EXTS = SOUNDFILE_EXTS | AV_EXTS  # not .npy: a library's .npy files are rarely waveforms


@dataclasses.dataclass
class Summary:
    """What a run did. ``failed`` counts songs by reason; ``failures`` holds their records."""

    songs: int = 0  # audio files found (this shard's)
    done_before: int = 0  # skipped: their outputs existed
    tagged: int = 0  # written in this run
    answers: int = 0
    failed: dict = dataclasses.field(default_factory=dict)
    failures: list = dataclasses.field(default_factory=list)
    ignored: int = 0  # files that are not audio
    seconds: float = 0.0
    output: str = ""
    failures_file: str | None = None
    stopped: str | None = None

    def line(self) -> str:
        rate = self.tagged / self.seconds * 3600 if self.seconds else 0.0
        text = (f"{self.tagged} of {self.songs} songs tagged in {self.seconds:.1f} s ({rate:.0f} songs/hour, "
                f"{self.answers / max(self.seconds, 1e-9):.2f} answers/s); {self.done_before} already done")
        if self.failed:
            text += f"; failed {sum(self.failed.values())}: " + ", ".join(f"{k} {v}"
                                                                          for k, v in sorted(self.failed.items()))
            text += f" (listed in {self.failures_file})"
        return text + f"; {self.ignored} other files ignored (not audio, or hidden); output: {self.output}"


def find_audio(root: Path) -> tuple[list[str], int]:
    """Audio files under ``root`` (recursive), as sorted POSIX paths relative to it, and the number
    of other files. Hidden files (``.x``, e.g. macOS ``._song.mp3`` stubs and our temporary files)
    count as other files; hidden folders (``.git``, our ``.OUT.parts``) are not entered."""
    songs, other = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and Path(f).suffix.lower() in AUDIO_EXTS:
                songs.append(Path(dirpath, f).relative_to(root).as_posix())
            else:
                other += 1
    return sorted(songs), other


def _seed(rel: str, name: str, seed: int) -> int:
    """A request's sampling seed from the song and question: answers do not depend on the batch,
    the shard or the order in which songs are tagged."""
    return zlib.crc32(f"{seed}\0{rel}\0{name}".encode()) & 0x7FFFFFFF


def tag_library(model, root, preset: Preset | str = "acestep", fmt: str = "acestep", out=None, *,
                overwrite: bool = False, shard: tuple[int, int] | None = None, max_new_tokens: int | None = None,
                temperature: float | None = None, seed: int = 0, progress: bool = True, stop=None) -> Summary:
    """Tag every audio file under ``root`` with ``model`` (a :class:`mufun_jax.MuFun`) and write
    ``fmt`` (see the module docstring). ``shard=(i, n)`` takes every n-th song of the sorted list
    from the i-th. ``stop`` (a :class:`~mufun_jax.preemption.GracefulStop`) ends the run after the
    song being written. Raises :class:`InputError` for unusable input before any work."""
    from tqdm.auto import tqdm

    root = Path(root)
    if not root.is_dir():
        raise InputError("usage", f"{root}: no such directory")
    preset = load_preset(preset) if isinstance(preset, str) else preset
    if fmt not in tag_formats.FORMATS:
        raise InputError("usage", f"--format {fmt!r}: expected one of {', '.join(tag_formats.FORMATS)}")
    out = Path(out) if out is not None else None
    writer = tag_formats.make_writer(fmt, root, out, has_lyrics=preset.has_lyrics, overwrite=overwrite, shard=shard,
                                     progress=progress)
    cap = preset.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    temp = preset.temperature if temperature is None else float(temperature)

    t0 = time.perf_counter()
    songs, ignored = find_audio(root)
    if shard is not None:
        songs = songs[shard[0]::shard[1]]
    summary = Summary(songs=len(songs), ignored=ignored, output=str(writer.path))
    fail_file = tag_formats.failures_path(writer)
    if shard is not None and isinstance(writer, tag_formats.SidecarWriter):
        fail_file = tag_formats.shard_name(fail_file, shard)
    summary.failures_file = str(fail_file)

    def fail(rel, reason, message, raw=None):
        summary.failed[reason] = summary.failed.get(reason, 0) + 1
        summary.failures.append({"path": rel, "reason": reason, "message": message, "raw": raw or {}})

    todo, owner = [], {}
    for rel in songs:
        key = writer.key(rel)
        if key in owner:  # e.g. a.mp3 and a.wav: both would write a_prompt.txt
            fail(rel, "name_clash", f"its outputs would overwrite those of {owner[key]}")
            continue
        owner[key] = rel
        if not overwrite and writer.done(rel):
            summary.done_before += 1
        else:
            todo.append(rel)

    requests = [{"id": (i, name), "prompt": q, "audio": str(root / rel), "seed": _seed(rel, name, seed)}
                for i, rel in enumerate(todo) for name, q in preset.questions.items()]
    n_q = len(preset.questions)
    pending: dict[int, dict] = {}
    bar = tqdm(total=len(todo), unit="song", desc=f"tag ({preset.name})", disable=not progress,
               dynamic_ncols=True)
    results = model.iter_results(requests, max_new_tokens=cap, temperature=temp, ordered=False) if todo else iter(())
    try:
        for r in results:
            i, name = r.id
            if r.ok:
                summary.answers += 1
            got = pending.setdefault(i, {})
            got[name] = r
            if len(got) < n_q:
                continue
            del pending[i]
            rel = todo[i]
            bad = next((x for x in got.values() if not x.ok), None)
            if bad is not None:
                fail(rel, bad.error, bad.message)
            else:
                try:
                    record = build_record(preset, {k: (x.text, x.finish_reason) for k, x in got.items()})
                except TagFailure as e:
                    fail(rel, e.reason, str(e), e.raw)
                else:
                    writer.write(rel, {"path": rel, **record})
                    summary.tagged += 1
            bar.update(1)
            el = max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix_str(f"{summary.tagged / el * 3600:.0f} songs/h, {summary.answers / el:.2f} ans/s",
                                refresh=False)
            if stop is not None and stop.requested:
                summary.stopped = stop.requested
                results.close()  # ends the engine and its audio threads; unfinished songs stay to do
                break
    finally:
        bar.close()
    writer.finish(preset.columns)
    if summary.failures:
        tag_formats.atomic_write(fail_file, "".join(json.dumps(f, ensure_ascii=False) + "\n"
                                                    for f in summary.failures))
    elif fail_file.exists() and not summary.stopped:
        fail_file.unlink()  # every song listed there was retried and is done now
    summary.seconds = time.perf_counter() - t0
    return summary


def main(argv=None) -> int:
    """``python -m mufun_jax.tagging`` / ``mufun-tag``."""
    from mufun_jax.cli import ArgumentParser, DefaultsHelpFormatter, setup_logging
    from mufun_jax.outputs import parse_shard

    ap = ArgumentParser(
        prog="mufun-tag", formatter_class=DefaultsHelpFormatter,
        description="Tag and transcribe every audio file under DIR into training data for music generators "
        "(ACE-Step sidecars, captions, JSONL, CSV or a Hugging Face dataset). Resumable: songs whose outputs "
        "exist are skipped; run the same command again after a kill. Exit status: 0 all songs tagged, 1 some "
        "failed (listed in the failures file), 2 usage error or unusable input, 75 stopped by SIGTERM.",
        epilog="example: mufun-tag converted/mufun-acestep songs/ --preset acestep --format acestep")
    ap.add_argument("model", metavar="MODEL", help="a converted model directory or a PyTorch MuFun checkpoint")
    ap.add_argument("root", metavar="DIR", help="the music library (searched recursively)")
    ap.add_argument("--preset", default="acestep", help="acestep (one JSON answer: prompt and lyrics), tags "
                    "(genre, mood, instruments, key, tempo, vocal, language) or a YAML file of named questions")
    ap.add_argument("--format", default="acestep", choices=tag_formats.FORMATS,
                    help="acestep: NAME_prompt.txt + NAME_lyrics.txt; caption: NAME.caption.txt + NAME.lyrics.txt; "
                         "jsonl / csv: one file; hf: a datasets.save_to_disk folder")
    ap.add_argument("--out", default=None, help="the file or dataset folder (jsonl, csv, hf); for acestep and "
                    "caption a folder that mirrors DIR (default: beside each audio file)")
    ap.add_argument("--overwrite", action="store_true", help="tag every song again, replacing its outputs")
    ap.add_argument("--shard", default=None, metavar="I/N", help="tag every N-th song from the I-th (file "
                    "outputs get .shard-I-of-N in their name)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="answer cap (default: the preset's, "
                    "1024 for acestep, 32 for tags)")
    ap.add_argument("--temperature", type=float, default=None, help="default: the preset's (0.2 for acestep "
                    "as in the reference demo; 0 = greedy for tags)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (each song and question gets its own)")
    ap.add_argument("--batch-size", type=int, default=8, help="decode slots: answers generated together")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype (default: float32 on CPU, bfloat16 on TPU/GPU)")
    ap.add_argument("--quantize", choices=("none", "int8", "nf4"), default="none",
                    help="weight-only quantisation, as in infer.py")
    ap.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory merged into MODEL at load")
    ap.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR", help="shard the parameters over a "
                    "(data, fsdp, tensor) mesh of this host's devices, one size may be -1 (e.g. 1,-1,1: FSDP over "
                    "all of them); default: one device")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    def usage(msg: str) -> int:
        print(f"mufun-tag: error: {msg}", file=sys.stderr)
        return 2

    for flag, v in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if v is not None and v < 1:
            return usage(f"{flag} {v} must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        return usage(f"--temperature {args.temperature} must be >= 0")
    if args.format == "hf":
        import importlib.util

        if importlib.util.find_spec("datasets") is None:  # optional: only the hf format needs it
            return usage("--format hf needs the datasets package: pip install 'mufun-jax[hf]' (or pip install "
                         "datasets)")
    try:
        shard = parse_shard(args.shard) if args.shard else None
        preset = load_preset(args.preset)
        if not Path(args.root).is_dir():
            return usage(f"{args.root}: no such directory")
        if not Path(args.model).exists():
            return usage(f"{args.model}: no such model directory")
        # Check the output before loading the model (that takes minutes for 8B weights).
        tag_formats.make_writer(args.format, Path(args.root), None if args.out is None else Path(args.out),
                                has_lyrics=preset.has_lyrics, overwrite=args.overwrite, shard=shard)
    except (InputError, ValueError, OSError) as e:
        return usage(str(e))
    mesh = None
    if args.mesh is not None:
        from mufun_jax.sharding import make_mesh

        try:
            sizes = [int(x) for x in args.mesh.split(",")]
            if len(sizes) != 3:
                raise ValueError
        except ValueError:
            return usage(f"--mesh {args.mesh!r} must be three sizes DATA,FSDP,TENSOR (e.g. 1,-1,1)")
        try:
            mesh = make_mesh(*sizes)
        except ValueError as e:
            return usage(f"--mesh {args.mesh}: {e}")
    setup_logging()
    from mufun_jax.api import MuFun
    from mufun_jax.preemption import GracefulStop
    from mufun_jax.torch_files import CheckpointError

    cap = args.max_new_tokens or preset.max_new_tokens
    try:
        model = MuFun.from_pretrained(args.model, dtype=args.dtype, adapter=args.adapter,
                                      quantize=None if args.quantize == "none" else args.quantize, mesh=mesh,
                                      batch_size=args.batch_size, max_new_tokens=cap,
                                      prefill_batch=min(4, args.batch_size))
    except (CheckpointError, OSError, ValueError) as e:
        return usage(f"cannot load the model: {e}")
    try:
        with GracefulStop() as stop:
            summary = tag_library(model, args.root, preset, args.format, args.out, overwrite=args.overwrite,
                                  shard=shard, max_new_tokens=cap, temperature=args.temperature, seed=args.seed,
                                  progress=not args.no_progress, stop=stop)
    except InputError as e:
        return usage(str(e))
    print(summary.line(), file=sys.stderr)
    if summary.stopped:
        print(f"mufun-tag: stopped by {summary.stopped}; run the same command again to finish", file=sys.stderr)
        return EXIT_PREEMPTED
    return 1 if summary.failed else 0


def entry() -> None:
    """The console script (see :func:`mufun_jax.cli_base.exit_with`)."""
    from mufun_jax.cli_base import exit_with

    exit_with(main())


if __name__ == "__main__":
    entry()
