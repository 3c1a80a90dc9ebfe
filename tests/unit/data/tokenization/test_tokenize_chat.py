"""Conversation masking, token by token, under three chat templates: the tiny ChatML one, one that injects a default
system prompt (as SmolLM2's does) and a Qwen-style one with tools, tool calls and reasoning. Also the fallback to
character offsets, and the clear error for a template whose prefixes do not line up."""

from __future__ import annotations

import os

import pytest

from tuneforge.data.tokenization.chat import (
    TemplateMismatch,
    conversation_tokens,
    normalize_messages,
    trained_spans,
)
from tuneforge.data.tokenization.examples import IGNORE
from tuneforge.data.tokenization.tokenize import tokenize_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
tiny = pytest.importorskip("tuneforge.train.tiny_models")

# SmolLM2-135M-Instruct's template, verbatim apart from the Jinja line breaks: no {% generation %} markers and a
# default system prompt whenever the conversation has none.
SMOL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5/Qwen3-style: tools in the system turn, <tool_call> JSON in assistant turns, consecutive tool results grouped
# into one user turn, reasoning in <think> (kept on every turn, as a training template must).
QWEN_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant\n"
    "{%- if message.reasoning_content %}<think>\n{{ message.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{- message.content }}"
    "{%- for tc in message.tool_calls or [] %}{% if not loop.first or message.content %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# As Qwen3's own template does: reasoning only on the last turn. A prefix ending at an earlier turn renders it
# with its reasoning, the whole conversation without, so no prefix lines up.
STRIPPING_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{%- if message.role == 'assistant' and message.reasoning_content and loop.last %}"
    "<think>{{ message.reasoning_content }}</think>{% endif %}"
    "{{ message.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# No separators: the end of one turn and the start of the next fall inside one BPE word.
RUN_ON_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content + eos_token }}"
    "{% else %}{{ m.content }}{% endif %}{% endfor %}"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Thank you."},
    {"role": "assistant", "content": "I am fine, thank you."},
]

NO_SYSTEM = CHAT[1:]


@pytest.fixture(scope="module")
def chatml():
    return tiny.make_tiny_tokenizer()


def _tok(template: str):
    tok = tiny.make_tiny_tokenizer()
    tok.chat_template = template
    return tok


def _trained_texts(tok, ids, labels) -> list[str]:
    assert len(ids) == len(labels)
    for token, label in zip(ids, labels, strict=True):
        assert label in (IGNORE, token)
    return [tok.decode(ids[a:b]) for a, b in trained_spans(labels)]


def _full_ids(tok, messages, tools=None) -> list[int]:
    out = tok.apply_chat_template(messages, tools=tools, tokenize=True)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


@pytest.mark.parametrize("template", ["chatml", "smol", "qwen"])
@pytest.mark.parametrize("messages", [CHAT, NO_SYSTEM], ids=["system", "no_system"])
def test_only_assistant_turns_and_their_end_of_turn_are_trained(chatml, template, messages):
    tok = {"chatml": chatml, "smol": _tok(SMOL_TEMPLATE), "qwen": _tok(QWEN_TEMPLATE)}[template]
    ids, labels = conversation_tokens(messages, None, tok, train_on_inputs=False)
    assert ids == _full_ids(tok, messages)  # exactly the template's rendering, as serving renders it
    expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert _trained_texts(tok, ids, labels) == expected


def test_the_default_system_prompt_is_rendered_and_masked():
    tok = _tok(SMOL_TEMPLATE)
    ids, _ = conversation_tokens(NO_SYSTEM, None, tok, train_on_inputs=False)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids_t, labels_t = conversation_tokens(NO_SYSTEM, None, tok, train_on_inputs=True)
    assert ids_t == ids
    assert labels_t[1:] == ids[1:]  # everything but the unpredicted first token
    assert labels_t[0] == IGNORE


@pytest.mark.parametrize("template", [None, SMOL_TEMPLATE, QWEN_TEMPLATE])
def test_weight_zero_turns_are_never_trained(chatml, template):
    tok = chatml if template is None else _tok(template)
    messages = [dict(m) for m in CHAT]
    messages[2]["weight"] = 0
    messages[1]["weight"] = 0
    ids, labels = conversation_tokens(messages, None, tok, train_on_inputs=False)
    assert _trained_texts(tok, ids, labels) == ["I am fine, thank you.<|im_end|>"]
    ids, labels = conversation_tokens(messages, None, tok, train_on_inputs=True)
    trained = "".join(_trained_texts(tok, ids, labels))
    assert "Paris" not in trained and "capital" not in trained
    assert "You are a helpful assistant." in trained and "I am fine, thank you.<|im_end|>" in trained
    assert "Thank you." in trained


def test_all_weights_zero_is_dropped_as_no_trained_tokens(chatml):
    messages = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in CHAT]
    examples, report = tokenize_records(
        [{"messages": messages}, {"messages": CHAT}],
        tokenizer=chatml,
        dataset_format="conversation",
        train_on_inputs=False,
        max_seq_length=512,
    )
    assert len(examples) == 1 and report.dropped_reasons == {"no_trained_tokens": 1}


@pytest.mark.parametrize("train_on_inputs", [False, "auto"])
def test_auto_masks_conversation_inputs_like_false(chatml, train_on_inputs):
    examples, _ = tokenize_records(
        [{"messages": CHAT}],
        tokenizer=chatml,
        dataset_format="conversation",
        train_on_inputs=train_on_inputs,
        max_seq_length=512,
    )
    assert _trained_texts(chatml, examples[0].input_ids, examples[0].labels) == [
        "The capital of France is Paris.<|im_end|>",
        "I am fine, thank you.<|im_end|>",
    ]


def test_tool_calls_and_reasoning_are_trained_tool_results_are_not():
    tok = _tok(QWEN_TEMPLATE)
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "reasoning": "I need two calls.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "assistant", "reasoning_content": "Combine them.", "content": "Paris is sunny, Rome has rain."},
    ]
    ids, labels = conversation_tokens(messages, TOOLS, tok, train_on_inputs=False)
    assert ids == _full_ids(tok, normalize_messages(messages), TOOLS)
    first, second = _trained_texts(tok, ids, labels)
    assert first == (
        "<think>\nI need two calls.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>'
    )
    assert second == "<think>\nCombine them.\n</think>\n\nParis is sunny, Rome has rain.<|im_end|>"
    text = tok.decode(ids)
    assert "# Tools" in text and "<tool_response>\nsunny" in text  # rendered, but masked


def test_normalize_messages_fills_what_templates_expect():
    (m,) = normalize_messages(
        [
            {
                "role": "assistant",
                "reasoning": "r",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "not json"}}],
            }
        ]
    )
    assert m["content"] == "" and m["reasoning_content"] == "r"
    assert m["tool_calls"][0]["function"]["arguments"] == "not json"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    (u,) = normalize_messages([{"role": "user", "content": parts}])
    assert u["content"] == "a\nb"


def test_images_are_dropped_with_a_reason(chatml):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What?"}, image]}, CHAT[2]]
    examples, report = tokenize_records(
        [{"messages": messages}],
        tokenizer=chatml,
        dataset_format="conversation",
        train_on_inputs=False,
        max_seq_length=64,
    )
    assert examples == [] and report.dropped_reasons == {"images": 1}


def test_token_prefixes_that_merge_fall_back_to_character_offsets():
    tok = _tok(RUN_ON_TEMPLATE)
    messages = [{"role": "user", "content": "The quick brown f"}, {"role": "assistant", "content": "ox jumps"}]
    full = _full_ids(tok, messages)
    head = _full_ids(tok, messages[:1])
    assert full[: len(head)] != head  # " f" + "ox" became " fox": the token prefixes do not line up
    ids, labels = conversation_tokens(messages, None, tok, train_on_inputs=False)
    assert ids == full
    (trained,) = _trained_texts(tok, ids, labels)
    assert trained.endswith("ox jumps<|im_end|>") and "quick" not in trained  # the straddling token is trained


def test_a_template_whose_prefixes_never_line_up_is_a_clear_error():
    tok = _tok(STRIPPING_TEMPLATE)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "greet", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "reasoning_content": "part", "content": "Bye!"},
    ]
    with pytest.raises(TemplateMismatch, match="not a prefix"):
        conversation_tokens(messages, None, tok, train_on_inputs=False)
    with pytest.raises(ValueError, match=r"^record 2: .*renders a turn differently"):
        tokenize_records(
            [{"messages": messages[:2]}, {"messages": messages}],
            tokenizer=tok,
            dataset_format="conversation",
            train_on_inputs=False,
            max_seq_length=256,
        )
    # one turn is fine: the last turn is the one that keeps its reasoning
    ids, labels = conversation_tokens(messages[:2], None, tok, train_on_inputs=False)
    assert _trained_texts(tok, ids, labels) == ["<think>greet</think>Hello!<|im_end|>"]


def test_a_generation_prompt_the_turns_do_not_repeat_is_handled():
    # like R1-style templates: the generation prompt opens a <think> block that rendered turns do not have
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    tok = _tok(template)
    ids, labels = conversation_tokens(NO_SYSTEM, None, tok, train_on_inputs=False)
    assert _trained_texts(tok, ids, labels) == [m["content"] + "<|im_end|>" for m in NO_SYSTEM[1::2]]


def test_a_template_that_raises_is_reported_with_its_record(chatml):
    tok = _tok("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="record 1: the chat template failed"):
        tokenize_records(
            [{"messages": CHAT}],
            tokenizer=tok,
            dataset_format="conversation",
            train_on_inputs=False,
            max_seq_length=64,
        )
