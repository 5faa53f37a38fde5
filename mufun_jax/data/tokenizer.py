"""A small byte-level BPE tokenizer with Qwen's special tokens, trained offline.

Qwen3's 151k-entry vocabulary would dominate a tiny demo model's parameters (and its files may
not be at hand), so the demo trains its own few-hundred-entry tokenizer on the exact strings the
chat template produces. It is the same kind of tokenizer as Qwen's (byte-level BPE, no BOS, the
special tokens split out before BPE), so the template's label algorithm works on it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from mufun_jax.data.templates import AUDIO_TAG, SEP, SYSTEM, get_template, turns_from_conversations

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2
_N_BYTES = 256  # the byte-level alphabet every vocabulary starts with


def _pieces(text: str) -> list[str]:
    """Split ``text`` where tokenisation splits it (audio tags, special tokens): BPE should learn
    merges only inside the pieces it will actually see."""
    pieces = [text]
    for sep in (AUDIO_TAG, *SPECIAL_TOKENS):
        pieces = [p for piece in pieces for p in piece.split(sep)]
    return [p for p in pieces if p]


def corpus_for(records: Iterable[dict], template: str = "qwen2_instruct") -> list[str]:
    """Each record's conversation rendered through ``template`` (so the BPE learns the strings
    training sees), cut into the pieces that are tokenised separately."""
    tpl = get_template(template)
    out: list[str] = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "conversations" not in record:
            raise ValueError(f"record {i} ({str(record)[:60]!r}) is not an object with 'conversations'")
        out.extend(_pieces(tpl.render(turns_from_conversations(record["conversations"]))))
    return out


def build_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (plus the system prompt and the template words, always),
    save it to ``out_dir`` and return it as loaded back by ``AutoTokenizer.from_pretrained``.

    The vocabulary holds the three special tokens (``<|endoftext|>`` = 0, the pad and eos token;
    ``<|im_start|>`` = 1; ``<|im_end|>`` = 2), the 256 byte symbols and at most
    ``vocab_size - 259`` merges; ``len(tokenizer)`` is the real size, which is smaller when the
    corpus runs out of pairs to merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    floor = _N_BYTES + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= {floor} "
                         f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens)")
    fixed = _pieces(SYSTEM + " USER: " + SEP + "ASSISTANT:")
    corpus: list[str] = [p for text in texts for p in _pieces(text)]
    if not all(isinstance(t, str) for t in corpus):
        raise ValueError("texts must be strings")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(fixed + corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    loaded = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
    _check(loaded, vocab_size, out_dir)
    return loaded


def _check(tok, vocab_size: int, where: Path) -> None:
    """What the template and the model rely on; a library change that breaks it should fail here,
    not as a silent mask or padding error later."""
    ids = [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS]
    if ids != [0, 1, 2]:
        raise RuntimeError(f"{where}: special tokens {SPECIAL_TOKENS} got ids {ids}, expected [0, 1, 2]")
    if tok.eos_token_id != 0 or tok.pad_token_id != 0:
        raise RuntimeError(f"{where}: eos/pad ids are {tok.eos_token_id}/{tok.pad_token_id}, expected 0/0")
    if len(tok) > vocab_size:
        raise RuntimeError(f"{where}: vocabulary has {len(tok)} entries, more than vocab_size={vocab_size}")
    if tok(IM_END, add_special_tokens=False).input_ids != [2]:
        raise RuntimeError(f"{where}: {IM_END!r} does not encode to the single id 2")


def special_ids(tok) -> dict[str, int]:
    """``{"endoftext", "im_start", "im_end"}`` -> id, for configuring a model that uses ``tok``."""
    return {name: tok.convert_tokens_to_ids(s)
            for name, s in zip(("endoftext", "im_start", "im_end"), SPECIAL_TOKENS)}
