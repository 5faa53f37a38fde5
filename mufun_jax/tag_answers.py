"""Presets and answer parsing of ``mufun-tag``: what is asked about each song, and how the answers
become a tag string and lyrics. Pure functions, tested on tables of answer strings.

**Tag normalisation** (:func:`normalise_tags`): the text is split on commas (``,``, ``，``, ``、``)
and line breaks; each piece is lowercased, its inner whitespace collapsed, and trimmed of
whitespace, bullets, quotes and end punctuation (``. ; : ! ?`` and their CJK forms); empty pieces go,
and repeats are dropped keeping the first. ``"Pop, Rock.\\npop , Dance Pop"`` -> ``pop, rock, dance pop``.

**Lyrics** (:func:`normalise_lyrics`): trimmed; an empty answer, the reference model's instrumental
answer ``纯音乐，请欣赏`` (any punctuation or spacing) and ``[inst]`` / ``[instrumental]`` /
``instrumental`` become ``[inst]``, ACE-Step's instrumental marker.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

from mufun_jax.errors import InputError

# The reference's MuFun-ACEStep Gradio demo, byte for byte (/work/shared/reference-facts.md).
ACESTEP_PROMPT = ("<audio>\nDeconstruct this song, listing its tags and lyrics. Directly output a JSON object with "
                  "prompt and lyrics fields, without any additional explanations or text.")
INST = "[inst]"
RESERVED = {"path", "audio", "prompt", "error", "raw"}  # record keys a question may not be named


class TagFailure(InputError):
    """A song whose answers cannot be turned into a record; ``raw`` keeps the answers as given."""

    def __init__(self, reason: str, message: str, raw: dict | None = None):
        super().__init__(reason, message)
        self.raw = raw or {}


@dataclasses.dataclass(frozen=True)
class Preset:
    """What to ask about every song. ``questions`` maps a column name to its question (without an
    ``<audio>`` tag, one is put in front; the acestep prompt carries its own). ``json_answer``: the
    single answer is a JSON object with ``prompt`` and ``lyrics``. Otherwise ``tag_questions``
    (default: all but ``lyrics``) make the tag string, and a question named ``lyrics`` gives the
    lyrics."""

    name: str
    questions: dict
    temperature: float = 0.0
    max_new_tokens: int = 64
    json_answer: bool = False
    tag_questions: tuple | None = None

    @property
    def has_lyrics(self) -> bool:
        return self.json_answer or "lyrics" in self.questions

    @property
    def columns(self) -> list[str]:
        """The record's columns besides ``path``: ``prompt``, ``lyrics``, then one per question."""
        extra = [] if self.json_answer else [q for q in self.questions if q != "lyrics"]
        return ["prompt", "lyrics"] + extra


PRESETS = {
    "acestep": Preset("acestep", {"acestep": ACESTEP_PROMPT}, temperature=0.2, max_new_tokens=1024,
                      json_answer=True),
    # Short questions in the style of MuFun's training data; one short answer each.
    "tags": Preset("tags", {
        "genre": "What is the genre of this music?",
        "mood": "What is the mood of this music?",
        "instruments": "Which instruments are played in this music?",
        "key": "What is the key of this music?",
        "tempo": "What is the tempo of this music in BPM?",
        "vocal": "Is this music vocal or instrumental?",
        "language": "What is the language of the vocals?",
    }, max_new_tokens=32),
}


def load_preset(spec: str) -> Preset:
    """``acestep``, ``tags`` or a YAML file: either a mapping ``name: question``, or
    ``{questions: {name: question}, tags: [names], temperature: t, max_new_tokens: n}``."""
    if spec in PRESETS:
        return PRESETS[spec]
    import yaml

    p = Path(spec)
    if not p.is_file():
        raise InputError("usage", f"--preset {spec!r}: not acestep, tags or an existing YAML file")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError("usage", f"--preset {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not doc:
        raise InputError("usage", f"--preset {p}: expected a mapping of question names to questions")
    qs = doc.get("questions", doc) if isinstance(doc.get("questions"), dict) else doc
    for name, q in qs.items():
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)) or name in RESERVED:
            raise InputError("usage", f"--preset {p}: question name {name!r} must be an identifier other than "
                                      f"{sorted(RESERVED)}")
        if not isinstance(q, str) or not q.strip():
            raise InputError("usage", f"--preset {p}: question {name!r} must be a non-empty string")
    tags = doc.get("tags") if qs is not doc else None
    if tags is not None and (not isinstance(tags, list) or any(t not in qs for t in tags)):
        raise InputError("usage", f"--preset {p}: 'tags' must list question names, got {tags!r}")
    kw = {}
    for key, typ in (("temperature", (int, float)), ("max_new_tokens", int)):
        if qs is not doc and key in doc:
            if not isinstance(doc[key], typ) or isinstance(doc[key], bool) or doc[key] < 0:
                raise InputError("usage", f"--preset {p}: {key} {doc[key]!r} must be a non-negative number")
            kw[key] = doc[key]
    return Preset(p.stem, dict(qs), tag_questions=tuple(tags) if tags is not None else None, **kw)


# -- normalisation ---------------------------------------------------------------------------------

_SPLIT = re.compile(r"[,，、\n]")
_TRIM = " \t\r-*•·\"'`“”‘’.。;；:：!！?？"
_INST_MARKERS = {"纯音乐请欣赏", "纯音乐", "[inst]", "[instrumental]", "instrumental", "inst"}


def normalise_tags(text) -> list[str]:
    """Tags of an answer (a string or a list of strings); see the module docstring for the rules."""
    if isinstance(text, (list, tuple)):
        text = ", ".join(str(t) for t in text)
    out = []
    for piece in _SPLIT.split(str(text or "")):
        tag = re.sub(r"\s+", " ", piece.lower()).strip(_TRIM)
        if tag and tag not in out:
            out.append(tag)
    return out


def normalise_lyrics(text) -> str:
    """Trimmed lyrics, or ``[inst]`` for an instrumental song (see the module docstring)."""
    if isinstance(text, (list, tuple)):
        text = "\n".join(str(t) for t in text)
    text = str(text or "").strip()
    key = re.sub(r"[\s,，.。!！、~～]", "", text.lower())
    return INST if not key or key in _INST_MARKERS else text


def is_instrumental(answer: str) -> bool:
    """Whether a vocal-or-instrumental answer says there is no singing."""
    a = answer.lower()
    return "instrumental" in a or "纯音乐" in a or bool(re.search(r"\bno (vocals?|singing|lyrics)\b", a))


# -- the acestep JSON answer -----------------------------------------------------------------------

_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)(?:```|$)", re.S)


def repair_json(text: str):
    """The JSON object in an almost-JSON answer, or None. Tries, in order: the text as is; inside a
    code fence; the first ``{...}`` with text before or after it; Python literal syntax (single
    quotes); trailing commas removed. Strings may hold raw line breaks (``strict=False``)."""
    text = text.strip()
    m = _FENCE.search(text)
    candidates = [text] + ([m.group(1).strip()] if m else [])
    dec = json.JSONDecoder(strict=False)
    for c in candidates:
        start = c.find("{")
        if start < 0:
            continue
        body = c[start:]
        try:
            obj, _ = dec.raw_decode(body)  # ignores whatever follows the object
            if isinstance(obj, dict):
                return obj
        except ValueError:
            pass
        end = body.rfind("}")
        if end < 0:
            continue
        body = body[:end + 1]
        for fix in (body, re.sub(r",\s*([}\]])", r"\1", body)):
            try:
                obj = ast.literal_eval(fix)  # single quotes, and Python's True/None
                if isinstance(obj, dict):
                    return obj
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
            try:
                obj = dec.decode(fix)
                if isinstance(obj, dict):
                    return obj
            except ValueError:
                pass
    return None


def parse_acestep(text: str, finish_reason: str | None = None) -> tuple[str, str]:
    """(prompt, lyrics) of an acestep answer, normalised; raises :class:`TagFailure`."""
    obj = repair_json(text)
    raw = {"acestep": text}
    if obj is None:
        if finish_reason == "length":
            raise TagFailure("answer_cut", "the JSON answer was cut at --max-new-tokens", raw)
        raise TagFailure("unparseable_json", "the answer is not a JSON object, even after repair", raw)
    lower = {str(k).strip().lower(): v for k, v in obj.items()}
    if "prompt" not in lower or "lyrics" not in lower:
        missing = [k for k in ("prompt", "lyrics") if k not in lower]
        raise TagFailure("missing_field", f"the JSON answer has no {' or '.join(missing)} field", raw)
    tags = normalise_tags(lower["prompt"])
    if not tags:
        raise TagFailure("empty_prompt", "the JSON answer's prompt field has no tags", raw)
    return ", ".join(tags), normalise_lyrics(lower["lyrics"])


def build_record(preset: Preset, answers: dict) -> dict:
    """A song's record (without ``path``) from ``{question name: (text, finish_reason)}``.
    Question columns hold the answers as the model gave them (stripped)."""
    if preset.json_answer:
        (text, reason), = answers.values()
        prompt, lyrics = parse_acestep(text, reason)
        return {"prompt": prompt, "lyrics": lyrics}
    texts = {k: v[0] for k, v in answers.items()}
    names = preset.tag_questions or tuple(q for q in preset.questions if q != "lyrics")
    inst = "vocal" in texts and is_instrumental(texts["vocal"])
    tags = []
    for name in names:
        if inst and name == "language":
            continue  # no vocals: the language answer is a guess
        for t in normalise_tags(texts[name]):
            if t not in tags:
                tags.append(t)
    if not tags:
        raise TagFailure("empty_prompt", "every tag answer is empty", texts)
    lyrics = normalise_lyrics(texts["lyrics"]) if "lyrics" in texts else (INST if inst else None)
    return {"prompt": ", ".join(tags), "lyrics": lyrics, **{k: v for k, v in texts.items() if k != "lyrics"}}
