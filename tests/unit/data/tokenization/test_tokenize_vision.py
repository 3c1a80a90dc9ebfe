"""Conversations with images through a vision-language model's own processor (`vision.VisionTokenizer`, a tiny
Idefics3 with SmolVLM's template): each image becomes the tokens the processor expands it to, only the assistant's
turns are trained, the example keeps its images in order, instruction records with an image prompt are a user and
an assistant turn, and a cut at max_seq_length through an image drops the example with its reason."""

from __future__ import annotations

import os

import pytest
from vision_support import COLOURS, QUESTION, data_url, image_message

from tuneforge.data.tokenization.examples import IGNORE
from tuneforge.data.tokenization.tokenize import preview_records, tokenize_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
tiny = pytest.importorskip("tuneforge.train.tiny_models")

RED, GREEN = data_url(COLOURS["red"]), data_url(COLOURS["green"])
IMAGE_RUN = ["<fake_token_around_image>", "<global-img>", *["<image>"] * 4, "<fake_token_around_image>"]


@pytest.fixture(scope="module")
def vt(tmp_path_factory):
    from tuneforge.train.vision import load_processor

    return load_processor(tiny.save_tiny_vlm(tmp_path_factory.mktemp("vlm")))


def _tokens(vt, ids):
    return vt.convert_ids_to_tokens(list(ids))


def _trained_text(vt, example):
    return vt.decode([t for t in example.labels if t != IGNORE])


def _sft(vt, records, **kw):
    args = {"tokenizer": vt, "dataset_format": "conversation", "train_on_inputs": False, "max_seq_length": 2048}
    return tokenize_records(records, **(args | kw))


def test_an_image_is_expanded_and_only_the_answer_is_trained(vt):
    record = {"messages": [image_message(RED), {"role": "assistant", "content": "red"}]}
    [example], report = _sft(vt, [record])
    tokens = _tokens(vt, example.input_ids)
    start = tokens.index("<fake_token_around_image>")
    assert tokens[start : start + len(IMAGE_RUN)] == IMAGE_RUN
    assert vt.decode(example.input_ids).startswith("<|im_start|>User:<fake_token_around_image>")
    assert _trained_text(vt, example) == " red<end_of_utterance>"  # the template's " " after "Assistant:" too
    assert example.images == (RED,)
    assert report.examples == 1 and report.dropped == 0


def test_two_images_in_two_turns_keep_their_order_and_both_answers_train(vt):
    messages = [image_message(RED), {"role": "assistant", "content": "red"},
                image_message(GREEN), {"role": "assistant", "content": "green"}]  # fmt: skip
    [example], _ = _sft(vt, [{"messages": messages}])
    assert example.images == (RED, GREEN)
    assert _tokens(vt, example.input_ids).count("<image>") == 8
    assert _trained_text(vt, example) == " red<end_of_utterance> green<end_of_utterance>"
    # the trained answers follow their own images: "red" before the second image's tokens start
    second = [i for i, t in enumerate(_tokens(vt, example.input_ids)) if t == "<global-img>"][1]
    first_trained = next(i for i, t in enumerate(example.labels) if t != IGNORE)
    assert first_trained < second


def test_weights_and_train_on_inputs_apply_as_for_text(vt):
    messages = [image_message(RED), {"role": "assistant", "content": "red", "weight": 0},
                {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
                {"role": "assistant", "content": "still red"}]  # fmt: skip
    [example], _ = _sft(vt, [{"messages": messages}])
    assert _trained_text(vt, example) == " still red<end_of_utterance>"
    [everything], _ = _sft(vt, [{"messages": messages[:2] + messages[2:]}], train_on_inputs=True)
    assert "<image>" in vt.decode([t for t in everything.labels if t != IGNORE])


def test_an_instruction_record_with_an_image_prompt_is_a_user_and_an_assistant_turn(vt):
    prompt = image_message(GREEN)["content"]
    [inst], report = _sft(vt, [{"prompt": prompt, "completion": "green"}], dataset_format="instruction")
    [conv], _ = _sft(vt, [{"messages": [image_message(GREEN), {"role": "assistant", "content": "green"}]}])
    assert (inst.input_ids, inst.labels, inst.images) == (conv.input_ids, conv.labels, conv.images)
    assert report.format == "instruction"


def test_a_cut_through_an_image_drops_the_example_and_a_cut_after_it_keeps_it(vt):
    record = {"messages": [image_message(RED, QUESTION * 3), {"role": "assistant", "content": "red"}]}
    [whole], _ = _sft(vt, [record])
    image_end = max(i for i, t in enumerate(_tokens(vt, whole.input_ids)) if t == "<image>") + 1
    kept, report = _sft(vt, [record], max_seq_length=len(whole.input_ids) - 2)
    assert len(kept) == 1 and kept[0].truncated and kept[0].images == (RED,)
    dropped, report = _sft(vt, [record], max_seq_length=image_end - 1)
    assert dropped == [] and report.dropped_reasons == {"images_cut": 1}


def test_the_preview_shows_the_expanded_image_tokens(vt):
    record = {"messages": [image_message(RED), {"role": "assistant", "content": "red"}]}
    [row] = preview_records([(1, record)], tokenizer=vt, dataset_format="conversation", train_on_inputs=False,
                            max_seq_length=2048)  # fmt: skip
    assert _tokens(vt, row.input_ids).count("<image>") == 4
