"""`HFTokenizer` (the torch-free tokenizer the API previews with) against transformers' `AutoTokenizer` (what a
training run loads) on the same saved folder: the same rendered text, ids, offsets and special tokens, and
`tokenize_records` giving the same examples and reports under several chat templates. Also where its templates and
special tokens come from, and `preview_records`, which keeps the rows training drops."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_tokenize_chat import CHAT, QWEN_TEMPLATE, RUN_ON_TEMPLATE, SMOL_TEMPLATE, STRIPPING_TEMPLATE, TOOLS

from tuneforge.data.tokenization.examples import IGNORE
from tuneforge.data.tokenization.hf_tokenizer import HFTokenizer, TokenizerFilesError, is_tokenizer_file, read_folder
from tuneforge.data.tokenization.tokenize import iter_jsonl, preview_records, tokenize_blob, tokenize_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
tiny = pytest.importorskip("tuneforge.train.tiny_models")
transformers = pytest.importorskip("transformers")

TEMPLATES = {"chatml": None, "smol": SMOL_TEMPLATE, "qwen": QWEN_TEMPLATE, "run_on": RUN_ON_TEMPLATE}
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris? é 中文 🙂"},
    {
        "role": "assistant",
        "reasoning": "One call.",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "assistant", "reasoning_content": "Answer.", "content": "  Sunny,\n\nwarm.  ", "weight": 1},
]
TEXT_PARTS = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
IMAGE = {"type": "image_url", "image_url": {"url": "data:,"}}
RECORDS = {
    "conversation": [
        {"messages": CHAT},
        {"messages": CHAT[1:]},
        {"messages": TOOL_CHAT, "tools": TOOLS},
        {"messages": [{**m, "weight": 0} if m["role"] == "assistant" else m for m in CHAT]},
        {"messages": [{"role": "user", "content": TEXT_PARTS}, {"role": "assistant", "content": "ab"}]},
    ],
    "instruction": [{"prompt": "Q: 2+2?\n", "completion": " A: 4."}, {"prompt": "", "completion": "x"}],
    "general": [{"text": "Hello, how are you today?"}, {"text": ""}, {"text": "  spaces \t and\nlines  "}],
}


def _save(folder: Path, template: str | None, *, bos: bool = False) -> Path:
    tok = tiny.make_tiny_tokenizer()
    if template is not None:
        tok.chat_template = template
    if bos:  # bos in front of plain text by default, as Llama's tokenizers do
        from tokenizers import processors

        tok._tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]),
            ]
        )
    tok.save_pretrained(folder)
    return folder


def _pair(folder: Path) -> tuple[Any, HFTokenizer]:
    return transformers.AutoTokenizer.from_pretrained(str(folder)), HFTokenizer(read_folder(folder))


def _outcome(call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # both must fail the same way
        return (type(exc).__name__, str(exc))


@pytest.mark.parametrize("bos", [False, True], ids=["plain", "bos"])
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_tokenization_is_the_same_as_with_autotokenizer(tmp_path: Path, template: str, bos: bool) -> None:
    hf, ours = _pair(_save(tmp_path, TEMPLATES[template], bos=bos))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    assert ours.special_tokens_map == hf.special_tokens_map
    for text in ("a", "Hello world  ", " leading", "é 中文 🙂", "<|im_start|>user\nhi<|im_end|>\n", ""):
        for special in (True, False):
            assert (
                ours(text, add_special_tokens=special)["input_ids"] == hf(text, add_special_tokens=special)["input_ids"]
            )
        mine = ours(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert [tuple(o) for o in mine] == [
            tuple(o) for o in hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ]
    batch = ["one", "two words", ""]
    assert ours(batch, add_special_tokens=False)["input_ids"] == hf(batch, add_special_tokens=False)["input_ids"]
    ids = hf("The quick brown fox.")["input_ids"]
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids[0]) == hf.convert_ids_to_tokens(ids[0])

    for messages in (CHAT, CHAT[1:], TOOL_CHAT):
        for tools in (None, TOOLS):
            for gen in (False, True):
                for tokenize in (False, True):
                    kwargs = {"tools": tools, "add_generation_prompt": gen, "tokenize": tokenize}
                    want = _outcome(hf.apply_chat_template, messages, **kwargs)
                    got = _outcome(ours.apply_chat_template, messages, **kwargs)
                    if tokenize and not isinstance(want, tuple):
                        want, got = list(want["input_ids"]), got["input_ids"]
                    assert got == want, (messages, kwargs)

    for fmt, records in RECORDS.items():
        for train_on_inputs in (True, False, "auto"):
            for max_seq_length in (512, 12):
                args = {"dataset_format": fmt, "train_on_inputs": train_on_inputs, "max_seq_length": max_seq_length}
                want = _outcome(tokenize_records, records, tokenizer=hf, **args)
                got = _outcome(tokenize_records, records, tokenizer=ours, **args)
                if isinstance(want, tuple):
                    assert got == want
                else:
                    assert got[0] == want[0] and got[1].to_dict() == want[1].to_dict(), args


def test_a_template_whose_turns_never_line_up_fails_the_same_way(tmp_path: Path) -> None:
    hf, ours = _pair(_save(tmp_path, STRIPPING_TEMPLATE))
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "greet", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "reasoning_content": "part", "content": "Bye!"},
    ]
    args: dict[str, Any] = {"dataset_format": "conversation", "train_on_inputs": False, "max_seq_length": 256}
    for tok in (hf, ours):
        with pytest.raises(ValueError, match="not a prefix"):
            tokenize_records([{"messages": messages}], tokenizer=tok, **args)
    raising = tmp_path / "raising"
    hf, ours = _pair(_save(raising, "{{ raise_exception('roles must alternate') }}"))
    errors = [
        _outcome(lambda tok=tok: tokenize_records([{"messages": CHAT}], tokenizer=tok, **args)) for tok in (hf, ours)
    ]
    assert errors[0] == errors[1] and "roles must alternate" in errors[0][1]


def test_the_template_sandbox_holds(tmp_path: Path) -> None:
    escape = "{{ messages.__class__.__mro__ }}"
    _, ours = _pair(_save(tmp_path, escape))
    with pytest.raises(Exception, match=r"unsafe|not safely|access"):
        ours.apply_chat_template(CHAT, tokenize=False)
    ns = tmp_path / "ns"
    _, ours = _pair(_save(ns, "{% set n = namespace(_x=1) %}{{ n._x }}"))
    with pytest.raises(Exception, match="underscore"):
        ours.apply_chat_template(CHAT, tokenize=False)
    helpers = tmp_path / "helpers"
    template = "{{ dict(a=1) | tojson }}|{{ '<é>' | tojson }}|{{ strftime_now('%Y') | length }}{{ eos_token }}"
    hf, ours = _pair(_save(helpers, template))
    assert ours.apply_chat_template(CHAT, tokenize=False) == hf.apply_chat_template(CHAT, tokenize=False)


def test_templates_and_special_tokens_come_from_where_transformers_reads_them(tmp_path: Path) -> None:
    folder = _save(tmp_path, "{{ 'default' }}")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'tools' }}")
    hf, ours = _pair(folder)
    assert ours.chat_template == hf.chat_template == {"default": "{{ 'default' }}", "tool_use": "{{ 'tools' }}"}
    assert ours.apply_chat_template(CHAT, tokenize=False) == "default"
    assert ours.apply_chat_template(CHAT, tools=TOOLS, tokenize=False) == "tools"
    assert is_tokenizer_file("additional_chat_templates/tool_use.jinja") and not is_tokenizer_file("model.safetensors")

    # An older layout: the template inside tokenizer_config.json, special tokens as AddedToken dicts.
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    config = {
        "chat_template": [{"name": "default", "template": "{{ bos_token }}x"}, {"name": "rag", "template": "r"}],
        "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False, "special": True},
        "eos_token": "<|im_end|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    (old / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}))
    hf, ours = _pair(old)
    assert ours.chat_template == hf.chat_template == {"default": "{{ bos_token }}x", "rag": "r"}
    assert ours.apply_chat_template(CHAT, tokenize=False) == hf.apply_chat_template(CHAT, tokenize=False)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )

    with pytest.raises(TokenizerFilesError, match=r"tokenizer\.json"):
        HFTokenizer({})
    with pytest.raises(TokenizerFilesError, match="JSON"):
        HFTokenizer({"tokenizer.json": (folder / "tokenizer.json").read_bytes(), "tokenizer_config.json": b"{"})
    bare = HFTokenizer({"tokenizer.json": (folder / "tokenizer.json").read_bytes()})
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(CHAT)


def test_preview_records_keeps_the_rows_training_drops(tmp_path: Path) -> None:
    _, tok = _pair(_save(tmp_path, None))
    lines = [
        {"messages": CHAT},
        {"messages": [{**m, "weight": 0} if m["role"] == "assistant" else m for m in CHAT]},
        {"messages": [{"role": "user", "content": [IMAGE]}, {"role": "assistant", "content": "a cat"}]},
        {"messages": CHAT[1:3]},
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    kept, report = tokenize_blob(
        io.BytesIO(data), filetype="jsonl", tokenizer=tok, dataset_format=None, train_on_inputs=False, max_seq_length=30
    )
    assert report.dropped_reasons == {"no_trained_tokens": 1, "images": 1}
    assert "last_untrained" not in report.to_dict() and json.loads(json.dumps(report.to_dict()))
    rows = preview_records(
        iter_jsonl(io.BytesIO(data)),
        tokenizer=tok,
        dataset_format="conversation",
        train_on_inputs=False,
        max_seq_length=30,
    )
    assert len(rows) == 4
    assert rows[0] == kept[0] and rows[3] == kept[1]  # what training keeps, unchanged
    assert rows[1].truncated and len(rows[1].input_ids) == 30 and set(rows[1].labels) == {IGNORE}
    assert rows[2].input_ids == [] and rows[2].labels == []  # images: nothing a text tokenizer can show
    boom = "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('boom') }}{% endif %}{% endfor %}"
    boom_chat = [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(ValueError, match=r"^line 2: .*boom"):
        preview_records(
            [(1, {"messages": CHAT}), (2, {"messages": boom_chat})],
            tokenizer=HFTokenizer({**read_folder(tmp_path), "chat_template.jinja": boom.encode()}),
            dataset_format="conversation",
            train_on_inputs=False,
            max_seq_length=30,
        )
