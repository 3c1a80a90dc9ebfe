"""`text` and `prompt`/`completion` tokenization, train_on_inputs per format, truncation and drop reasons, the
report's numbers, JSONL blobs (format detection, blank and bad lines) and pre-tokenized parquet, the preview row."""

from __future__ import annotations

import io
import json
import os

import pytest

from tuneforge.data.tokenization.chat import render_preview_row
from tuneforge.data.tokenization.examples import IGNORE, TokenizationReport, TokenizedExample
from tuneforge.data.tokenization.tokenize import tokenize_blob, tokenize_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
tiny = pytest.importorskip("tuneforge.train.tiny_models")


@pytest.fixture(scope="module")
def tok():
    return tiny.make_tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """A tokenizer that puts bos in front of plain text by default (as Llama's do)."""
    from tokenizers import processors

    t = tiny.make_tiny_tokenizer()
    t._tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]),
        ]
    )
    return t


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _run(tok, records, fmt, train_on_inputs="auto", max_seq_length=512):
    return tokenize_records(
        records, tokenizer=tok, dataset_format=fmt, train_on_inputs=train_on_inputs, max_seq_length=max_seq_length
    )


@pytest.mark.parametrize("train_on_inputs", [True, False, "auto"])
def test_text_trains_every_token_and_ends_with_eos(tok, train_on_inputs):
    (ex,), report = _run(tok, [{"text": "The quick brown fox."}], "general", train_on_inputs)
    body = _enc(tok, "The quick brown fox.")
    assert ex.input_ids == [*body, tok.eos_token_id]
    assert ex.labels == [IGNORE, *ex.input_ids[1:]]  # nothing predicts the first token
    assert report.format == "general" and report.trained_tokens == len(body) and report.masked_tokens == 1


def test_text_gets_bos_when_the_tokenizer_adds_it(bos_tok):
    (ex,), _ = _run(bos_tok, [{"text": "Hello"}], "general")
    assert ex.input_ids == [1, *_enc(bos_tok, "Hello"), bos_tok.eos_token_id]
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]


@pytest.mark.parametrize(("train_on_inputs", "prompt_trained"), [(True, True), (False, False), ("auto", False)])
def test_instruction_masks_the_prompt_unless_training_on_inputs(tok, train_on_inputs, prompt_trained):
    record = {"prompt": "What is the capital of France?", "completion": " Paris."}
    (ex,), _ = _run(tok, [record], "instruction", train_on_inputs)
    prompt, completion = _enc(tok, record["prompt"]), _enc(tok, record["completion"])
    assert ex.input_ids == prompt + completion + [tok.eos_token_id]
    trained = [t for t in ex.labels if t != IGNORE]
    if prompt_trained:
        assert trained == ex.input_ids[1:]
    else:
        assert ex.labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert tok.decode(trained) == " Paris.<|im_end|>"


def test_instruction_with_bos(bos_tok):
    (ex,), _ = _run(bos_tok, [{"prompt": "Hi", "completion": "Hello"}], "instruction", False)
    assert ex.input_ids[0] == 1
    assert bos_tok.decode([t for t in ex.labels if t != IGNORE]) == "Hello<|im_end|>"


def test_truncation_is_counted_and_drops_have_reasons(tok):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 4
    records = [
        {"prompt": long_prompt, "completion": "Paris."},  # completion lies past the cut
        {"prompt": "Hi", "completion": "Hello, how are you today? " * 4},  # cut inside the completion: kept
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": "", "completion": ""},  # no text at all
    ]
    examples, report = _run(tok, records, "instruction", False, max_seq_length=16)
    assert [len(e.input_ids) for e in examples] == [16, len(_enc(tok, "HiHello")) + 1]
    assert [e.truncated for e in examples] == [True, False]
    assert report.truncated == 1 and report.examples == 2
    assert report.dropped == 2
    assert report.dropped_reasons == {"no_trained_tokens_after_truncation": 1, "empty": 1}
    _, report = _run(tok, [{"text": ""}, {"text": "Hi"}], "general")
    assert report.dropped_reasons == {"empty": 1} and report.examples == 1


def test_report_numbers_and_dict(tok):
    records = [
        {"prompt": "What is the capital of France?", "completion": " Paris."},
        {"prompt": "Hi", "completion": "Hello"},
    ]
    examples, report = _run(tok, records, "instruction", False)
    trained = sum(sum(1 for t in e.labels if t != IGNORE) for e in examples)
    total = sum(len(e.input_ids) for e in examples)
    assert report.trained_tokens == trained and report.masked_tokens == total - trained
    assert report.trained_share() == pytest.approx(trained / total)
    wire = report.to_dict()
    assert json.loads(json.dumps(wire)) == wire
    assert set(wire) >= {"examples", "trained_tokens", "masked_tokens", "truncated", "dropped", "dropped_reasons"}
    assert wire["format"] == "instruction"
    assert TokenizationReport().trained_share() == 0.0


def test_bad_arguments_are_value_errors(tok):
    with pytest.raises(ValueError, match="train_on_inputs"):
        _run(tok, [{"text": "a"}], "general", "yes")
    with pytest.raises(ValueError, match="tokenize_preference_records"):
        _run(tok, [], "preference_openai")
    with pytest.raises(ValueError, match="max_seq_length"):
        _run(tok, [], "general", max_seq_length=0)


def test_surprising_records_are_dropped_not_fatal(tok):
    examples, report = _run(tok, [{"text": 3}, {"nope": 1}, {"text": "ok"}], "general")
    assert len(examples) == 1 and report.dropped_reasons == {"malformed": 2}
    _, report = _run(tok, [{"messages": []}, {"messages": "x"}], "conversation")
    assert report.dropped_reasons == {"malformed": 2}


def _jsonl(*records, blank: bool = False) -> io.BytesIO:
    lines = [json.dumps(r) for r in records]
    if blank:
        lines.insert(1, "")
    return io.BytesIO(("\n".join(lines) + "\n").encode())


def test_jsonl_blob_detects_the_format_and_matches_records(tok):
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Paris."}]},
    ]
    blob_examples, blob_report = tokenize_blob(
        _jsonl(*records, blank=True),
        filetype="jsonl",
        tokenizer=tok,
        dataset_format=None,
        train_on_inputs="auto",
        max_seq_length=64,
    )
    examples, report = _run(tok, records, "conversation")
    assert blob_examples == examples and blob_report == report and report.format == "conversation"


def test_jsonl_blob_counts_undecodable_lines_and_names_lines_in_errors(tok):
    stream = io.BytesIO(b'{"text": "Hi"}\nnot json\n[1]\n{"text": "Hello"}\n')
    examples, report = tokenize_blob(
        stream, filetype="jsonl", tokenizer=tok, dataset_format="general", train_on_inputs=True, max_seq_length=8
    )
    assert len(examples) == 2 and report.dropped_reasons == {"malformed": 2}
    bad = tiny.make_tiny_tokenizer()
    bad.chat_template = "{{ raise_exception('no') }}"
    stream = _jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, blank=True)
    with pytest.raises(ValueError, match=r"^line 1: "):
        tokenize_blob(
            stream, filetype="jsonl", tokenizer=bad, dataset_format=None, train_on_inputs=False, max_seq_length=8
        )
    with pytest.raises(ValueError, match="file type"):
        tokenize_blob(
            io.BytesIO(), filetype="csv", tokenizer=tok, dataset_format=None, train_on_inputs=False, max_seq_length=8
        )
    examples, report = tokenize_blob(
        io.BytesIO(b"\n"), filetype="jsonl", tokenizer=tok, dataset_format=None, train_on_inputs=False, max_seq_length=8
    )
    assert examples == [] and report.examples == 0


def _parquet(columns: dict) -> io.BytesIO:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    buf.seek(0)
    return buf


class _NoCalls:
    def __getattr__(self, name):
        raise AssertionError(f"parquet data must not call the tokenizer ({name})")


def test_parquet_rows_are_taken_as_they_are():
    stream = _parquet(
        {
            "input_ids": [[5, 6, 7, 8, 3, 3], [9, 10, 11], [12, 13, 14, 15, 16]],
            "attention_mask": [[1, 1, 1, 1, 0, 0], [1, 1, 1], [1, 1, 1, 1, 1]],
            "labels": [[-100, -100, 7, 8, -100, -100], [-100, -100, -100], [12, 13, 14, 15, 16]],
        }
    )
    examples, report = tokenize_blob(
        stream, filetype="parquet", tokenizer=_NoCalls(), dataset_format=None, train_on_inputs=False, max_seq_length=4
    )
    assert examples == [
        TokenizedExample([5, 6, 7, 8], [-100, -100, 7, 8]),  # padding removed
        TokenizedExample([12, 13, 14, 15], [-100, 13, 14, 15], truncated=True),
    ]
    assert report.format == "parquet" and report.dropped_reasons == {"no_trained_tokens": 1}
    assert report.truncated == 1 and report.trained_tokens == 5 and report.masked_tokens == 3


def test_parquet_labels_default_to_the_attended_input_ids_and_position_ids_are_kept():
    stream = _parquet(
        {
            "input_ids": [[5, 6, 7, 8, 9, 0]],
            "attention_mask": [[1, 1, 1, 1, 1, 0]],
            "position_ids": [[0, 1, 2, 0, 1, 2]],
        }
    )
    (ex,), _ = tokenize_blob(
        stream, filetype="parquet", tokenizer=_NoCalls(), dataset_format=None, train_on_inputs=True, max_seq_length=8
    )
    assert ex.input_ids == [5, 6, 7, 8, 9]
    assert ex.labels == [-100, 6, 7, -100, 9]  # each packed sequence's first token is not predicted
    assert ex.position_ids == [0, 1, 2, 0, 1]


def test_preview_row_shape(tok):
    (ex,), _ = _run(tok, [{"prompt": "Hi", "completion": "Hello"}], "instruction", False, max_seq_length=512)
    row = render_preview_row(ex.input_ids, ex.labels, tok, truncated=ex.truncated)
    keys = {"input_ids", "labels", "tokens", "num_tokens", "num_trained_tokens", "trained_spans", "truncated"}
    assert set(row) == keys
    assert row["num_tokens"] == len(row["tokens"]) == len(row["input_ids"]) == len(row["labels"])
    assert row["tokens"] == tok.convert_ids_to_tokens(ex.input_ids)
    (span,) = row["trained_spans"]
    assert tok.decode(ex.input_ids[span[0] : span[1]]) == "Hello<|im_end|>"
    assert row["num_trained_tokens"] == span[1] - span[0] and row["truncated"] is False
    assert json.loads(json.dumps(row)) == row
    with pytest.raises(ValueError):
        render_preview_row([1, 2], [1], tok)


@pytest.mark.parametrize(
    ("column", "rows", "words"),
    [
        ("input_ids", [[5, 6], [7, 16]], "row 2: input_ids holds token id 16, outside the model's vocabulary of 16"),
        ("input_ids", [[-1, 6]], "row 1: input_ids holds token id -1"),
        ("labels", [[5, 99]], "row 1: labels holds token id 99"),
    ],
)
def test_parquet_ids_outside_the_vocabulary_are_refused_by_row(column, rows, words):
    data = {"input_ids": [[5, 6]] * len(rows), "labels": [[-100, 6]] * len(rows)} | {column: rows}
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        tokenize_blob(_parquet(data), filetype="parquet", tokenizer=_NoCalls(), dataset_format=None,
                      train_on_inputs=False, max_seq_length=8, vocab_size=16)  # fmt: skip
    # -100 labels are fine, and without a vocabulary nothing is checked
    ok = {"input_ids": [[5, 15]], "labels": [[-100, 15]]}
    assert tokenize_blob(_parquet(ok), filetype="parquet", tokenizer=_NoCalls(), dataset_format=None,
                         train_on_inputs=False, max_seq_length=8, vocab_size=16)[0]  # fmt: skip
