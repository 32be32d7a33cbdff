"""Prompt assembly: the conversation template, T slots, and the errors for slots that cannot work."""

import pytest
import torch

from apet_trt.runtime.prompt import PromptAssembler, PromptFormat
from helpers.engines import TEMPLATE, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _assembler(tok, t):
    fmt = PromptFormat(template=TEMPLATE, image_token="<image>", image_token_id=tok.convert_tokens_to_ids("<image>"))
    assembler = PromptAssembler(fmt, tok)
    return lambda prompt, index=0: assembler(prompt, t, index)


@pytest.mark.parametrize("t", [1, 5, 64])
def test_slots_expand_to_t_contiguous_image_ids(tok, t):
    a = _assembler(tok, t)(" What is shown?")
    image_id = tok.convert_tokens_to_ids("<image>")
    # independent expectation: tokenize the parts around the placeholder separately
    head = tok("USER: ", add_special_tokens=True)["input_ids"]
    tail = tok("\n What is shown? ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert a.input_ids.tolist() == head + [image_id] * t + tail
    assert a.image_slots.tolist() == list(range(len(head), len(head) + t))
    assert a.input_ids.dtype == torch.int64


def test_full_conversation_text_is_taken_as_written(tok):
    a = _assembler(tok, 3)("<image>\nCaption:")
    assert a.text == "<image>\nCaption:"
    assert a.image_slots.tolist() == [1, 2, 3]


def test_more_slots_than_images_is_an_error(tok):
    with pytest.raises(ValueError, match="prompt 4: 2 image slots"):
        _assembler(tok, 3)("USER: <image> and <image>?", index=4)


def test_template_without_slot_or_prompt_is_an_error(tok):
    with pytest.raises(ValueError, match="exactly once"):
        PromptAssembler(PromptFormat("USER: {prompt} ASSISTANT:", "<image>", 259), tok)
    with pytest.raises(ValueError, match="no '\\{prompt\\}'"):
        PromptAssembler(PromptFormat("USER: <image> ASSISTANT:", "<image>", 259), tok)


def test_tokenizer_that_splits_the_image_token_is_caught(tok):
    fmt = PromptFormat(template=TEMPLATE, image_token="<image>", image_token_id=7)
    with pytest.raises(ValueError, match="does not map '<image>' to a single special token"):
        PromptAssembler(fmt, tok)("hi", 2)


def test_non_string_prompt(tok):
    with pytest.raises(TypeError, match="prompt 0: expected a string"):
        _assembler(tok, 2)(123)


def test_each_image_expands_to_its_own_rows(tok):
    """Two images with different row counts: each placeholder becomes its own contiguous run."""
    image_id = tok.convert_tokens_to_ids("<image>")
    fmt = PromptFormat(template=TEMPLATE, image_token="<image>", image_token_id=image_id)
    a = PromptAssembler(fmt, tok)("USER: <image> vs <image>? ASSISTANT:", [3, 5])
    head = tok("USER: ", add_special_tokens=True)["input_ids"]
    mid = tok(" vs ", add_special_tokens=False)["input_ids"]
    tail = tok("? ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert a.input_ids.tolist() == head + [image_id] * 3 + mid + [image_id] * 5 + tail
    assert a.rows == (3, 5) and a.image_slots.numel() == 8
    with pytest.raises(ValueError, match="at least one visual row"):
        PromptAssembler(fmt, tok)("x", [0])
    with pytest.raises(ValueError, match="2 image\\(s\\) but only 1 image slot"):
        PromptAssembler(fmt, tok)("x", [3, 5])
