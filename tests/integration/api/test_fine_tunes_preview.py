"""`POST /fine-tunes/preview` (api-contract 3.10), in process: through the real SDK, row by row against what a training
run tokenizes for a job created on the same file and model, and every refusal with the parameter it names.

The models are tiny ones from `tuneforge.train.tiny_models` (a ChatML BPE tokenizer), registered as `local` catalog
entries; the built-in SmolLM2 stands for a model not converted yet, and its cache folder is faked to make it ready.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from together.types import FineTunePreviewResponse

from tuneforge.catalog import background
from tuneforge.catalog.entries import ModelEntry, ModelLimits
from tuneforge.catalog.source import safe_name
from tuneforge.data.tokenization.examples import IGNORE
from tuneforge.store import files as files_repo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
tiny = pytest.importorskip("tuneforge.train.tiny_models")

TINY = "tiny/chatml"
SHORT = "tiny/short"  # the same model with max_seq_length 32, for truncation
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = [
    {
        "messages": [
            SYSTEM,
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            {"role": "user", "content": "Thank you."},
            {"role": "assistant", "content": "You are welcome."},
        ]
    }
    for i in range(7)
]
INSTRUCTIONS = [{"prompt": f"Capital of France, take {i}?", "completion": " Paris."} for i in range(4)]
TEXTS = [{"text": f"The quick brown fox jumps over the lazy dog {i} times."} for i in range(4)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tiny.save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama"))


@pytest.fixture
def models(ft: Any, tiny_folder: Path) -> Path:
    catalog = ft.app.state.catalog
    catalog.add(ModelEntry(name=TINY, source_kind="local", source=str(tiny_folder)))
    short = ModelLimits(max_seq_length=32, max_seq_length_dpo=32)
    catalog.add(ModelEntry(name=SHORT, source_kind="local", source=str(tiny_folder), limits=short))
    return tiny_folder


def _preview(ft: Any, who: str = "alice", **body: Any) -> Any:
    return ft.client.post("/v1/fine-tunes/preview", json=body, headers=ft.alice if who == "alice" else ft.bob)


def _ok(ft: Any, **body: Any) -> dict[str, Any]:
    r = _preview(ft, **body)
    assert r.status_code == 200, r.text
    FineTunePreviewResponse.model_validate(r.json(), strict=True)
    return dict(r.json())


def _refused(ft: Any, status: int, param: str, *fragments: str, who: str = "alice", **body: Any) -> str:
    r = _preview(ft, who=who, **body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, r.text
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return str(error["message"])


def _decode(folder: Path, ids: list[int]) -> str:
    from tokenizers import Tokenizer

    return str(Tokenizer.from_file(str(folder / "tokenizer.json")).decode(ids, skip_special_tokens=False))


# -- what the preview shows ----------------------------------------------------------------------------------------


def test_the_sdk_previews_the_first_rows_masked_as_training_masks_them(ft: Any, models: Path) -> None:
    file_id = ft.upload(CONVERSATIONS)
    sdk = ft.sdk()  # strict response validation
    got = sdk.fine_tuning.preview(model=TINY, training_file=file_id)
    assert got.model == TINY and got.dataset_format == "conversation" and got.max_seq_length == 2048
    assert got.train_on_inputs is False  # "auto" masks the inputs of conversations
    assert len(got.rows) == 5  # the default top_k, as Together's
    for i, row in enumerate(got.rows):
        assert row.num_tokens == len(row.input_ids) == len(row.labels) == len(row.tokens)
        assert row.num_trained_tokens == sum(1 for t in row.labels if t != IGNORE)
        assert not row.truncated
        trained = [_decode(models, row.input_ids[a:b]) for a, b in row.trained_spans]
        assert trained == [f"{i} plus {i} is {2 * i}.<|im_end|>", "You are welcome.<|im_end|>"]
        assert _decode(models, row.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert "".join(got.rows[0].tokens).replace("Ċ", "\n").startswith("<|im_start|>system\n")

    everything = sdk.fine_tuning.preview(model=TINY, training_file=file_id, top_k=50, train_on_inputs=True)
    assert len(everything.rows) == len(CONVERSATIONS) and everything.train_on_inputs is True
    for row in everything.rows:
        assert row.trained_spans == [[1, row.num_tokens]]  # all but the first token, which nothing predicts
    one = sdk.fine_tuning.preview(model=TINY, training_file=file_id, top_k=1, training_method="sft")
    assert len(one.rows) == 1 and one.rows[0] == got.rows[0]


@pytest.mark.parametrize("train_on_inputs", [None, True, False])
@pytest.mark.parametrize("records", [CONVERSATIONS, INSTRUCTIONS, TEXTS], ids=["conversation", "instruction", "text"])
def test_rows_are_exactly_what_a_job_on_the_same_file_and_model_trains_on(
    ft: Any, models: Path, records: list[dict[str, Any]], train_on_inputs: bool | None
) -> None:
    """The preview against the training run's own path: the job's stored hyperparameters, its model folder as
    `catalog.loading` resolves it, `AutoTokenizer`, and `tokenize_blob` over the stored file."""
    from transformers import AutoTokenizer

    from tuneforge.catalog.loading import resolve_model_dir
    from tuneforge.catalog.source import ModelSource
    from tuneforge.data.tokenization.tokenize import tokenize_blob
    from tuneforge.store import jobs as jobs_repo

    file_id = ft.upload(records)
    method = {"method": "sft", "train_on_inputs": "auto" if train_on_inputs is None else train_on_inputs}
    job = ft.create(ft.sdk_body(file_id, model=TINY, training_method=method))
    with ft.app.state.db.session() as s:
        params = jobs_repo.get_job(s, job_id=job["id"], owner="alice").params
    hyper = params["hyper"]
    folder = resolve_model_dir(ModelSource(**params["model_source"]), ft.settings.home / "models")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with ft.app.state.blobs.open(f"files/{file_id}") as stream:
        trained, _ = tokenize_blob(
            stream,
            filetype="jsonl",
            tokenizer=tokenizer,
            dataset_format=None,
            train_on_inputs=hyper["train_on_inputs"],
            max_seq_length=hyper["max_seq_length"],
        )

    body: dict[str, Any] = {"model": TINY, "training_file": file_id, "top_k": 50}
    if train_on_inputs is not None:
        body["train_on_inputs"] = train_on_inputs
    got = _ok(ft, **body)
    assert got["max_seq_length"] == hyper["max_seq_length"]
    assert len(got["rows"]) == len(trained) == len(records)
    for row, example in zip(got["rows"], trained, strict=True):
        assert row["input_ids"] == example.input_ids
        assert row["labels"] == example.labels
        assert row["truncated"] == example.truncated
        assert row["tokens"] == tokenizer.convert_ids_to_tokens(example.input_ids)
    # "auto" (the default) trains the inputs of text only: text has no inputs to mask.
    resolved = train_on_inputs if train_on_inputs is not None else got["dataset_format"] == "general"
    assert got["train_on_inputs"] is resolved
    if records is INSTRUCTIONS and not resolved:
        for row in got["rows"]:
            assert [_decode(models, row["input_ids"][a:b]) for a, b in row["trained_spans"]] == [" Paris.<|im_end|>"]


def test_rows_training_drops_or_cuts_are_shown_in_place(ft: Any, models: Path) -> None:
    messages = CONVERSATIONS[0]["messages"]
    unweighted = {"messages": [{**m, "weight": 0} if m["role"] == "assistant" else m for m in messages]}
    long_prompt = {
        "messages": [
            {"role": "user", "content": "What is the capital of France? " * 8},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    long_answer = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello, how are you today? I am fine, thank you. The quick brown fox."},
        ]
    }
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris."}]}
    records = [long_answer, unweighted, long_prompt, short]
    file_id = ft.upload(records)
    got = _ok(ft, model=SHORT, training_file=file_id, top_k=10)
    assert got["max_seq_length"] == 32 and len(got["rows"]) == 4
    first, untrained, cut, last = got["rows"]
    # Weight 0 on every answer: training drops the row; the preview shows it with nothing trained.
    assert untrained["num_trained_tokens"] == 0 and untrained["trained_spans"] == []
    assert set(untrained["labels"]) == {IGNORE} and untrained["num_tokens"] == 32 and untrained["truncated"]
    # The cut at max_seq_length leaves only the prompt: dropped by training, shown cut and untrained.
    assert cut["truncated"] and cut["num_tokens"] == 32 and cut["num_trained_tokens"] == 0
    # Cut inside the answer: trained up to the cut.
    assert first["truncated"] and first["num_tokens"] == 32 and first["trained_spans"][0][1] == 32
    assert not last["truncated"] and last["num_tokens"] < 32
    assert [_decode(models, last["input_ids"][a:b]) for a, b in last["trained_spans"]] == ["Paris.<|im_end|>"]


def test_a_model_may_be_named_by_a_job_or_its_output(ft: Any, models: Path) -> None:
    file_id = ft.upload(CONVERSATIONS)
    job = ft.create(ft.sdk_body(file_id, model=TINY))
    direct = _ok(ft, model=TINY, training_file=file_id, top_k=2)
    for name in (job["id"], job["model_output_name"]):
        assert _ok(ft, model=name, training_file=file_id, top_k=2) == direct
    _refused(ft, 404, "model", who="bob", model=job["id"], training_file=ft.upload(CONVERSATIONS, who="bob"))


# -- where the tokenizer comes from ----------------------------------------------------------------------------------


def test_a_gguf_model_is_previewable_once_a_run_has_converted_it(ft: Any, tiny_folder: Path) -> None:
    file_id = ft.upload(CONVERSATIONS)
    r = _preview(ft, model=ft.model, training_file=file_id)
    assert r.status_code == 409 and r.json()["error"]["param"] == "model", r.text
    assert "GGUF" in r.json()["error"]["message"] and "fine-tune job" in r.json()["error"]["message"]
    assert r.headers["x-should-retry"] == "false"  # the SDK would otherwise ask twice more

    folder = ft.settings.home / "models" / safe_name(ft.model)  # where catalog.loading converts it to
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        (folder / name).write_bytes((tiny_folder / name).read_bytes())
    got = _ok(ft, model=ft.model, training_file=file_id, top_k=1)
    assert got["model"] == ft.model and got["max_seq_length"] == 8192 and got["rows"][0]["num_trained_tokens"] > 0

    # A re-conversion (new files) is picked up, not served from the cache.
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content + eos_token }}{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    again = _ok(ft, model=ft.model, training_file=file_id, top_k=1)
    assert again["rows"][0]["num_tokens"] < got["rows"][0]["num_tokens"]


def test_a_preview_before_any_run_prepares_the_model_in_the_background(ft: Any, tmp_path: Path) -> None:
    """The first preview spawns `python -m tuneforge.catalog.prepare` (as a run would convert the GGUF file); its
    answer says so, and a failed preparation is reported, with its reason, by the next preview, which tries again."""
    file_id = ft.upload(CONVERSATIONS)
    missing = tmp_path / "gone.gguf"
    ft.app.state.catalog.add(ModelEntry(name="me/ggufy", source_kind="gguf", source=str(missing)))
    ft.settings.prepare_models = True
    try:
        first = _refused(ft, 409, "model", "being prepared", "GGUF", model="me/ggufy", training_file=file_id)
        assert "failed" not in first
        deadline = time.monotonic() + 120
        while True:  # the child fails at once (no GGUF file); the next preview says why, and starts another
            message = _refused(ft, 409, "model", "being prepared", model="me/ggufy", training_file=file_id)
            if "failed" in message:
                break
            assert time.monotonic() < deadline, message
            time.sleep(0.5)
        assert str(missing) in message and "not found" in message, message
    finally:
        background.stop_all()
        ft.settings.prepare_models = False


def test_hub_and_output_models_are_read_where_training_reads_them(ft: Any, tiny_folder: Path) -> None:
    file_id = ft.upload(CONVERSATIONS)
    catalog = ft.app.state.catalog
    catalog.add(ModelEntry(name="org/hubby", source_kind="hub", source="org/hubby"))
    _refused(ft, 409, "model", "Hugging Face", model="org/hubby", training_file=file_id)
    repo = ft.settings.home / "models" / "hub" / "models--org--hubby"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (snapshot / name).write_bytes((tiny_folder / name).read_bytes())
    assert _ok(ft, model="org/hubby", training_file=file_id, top_k=1)["rows"][0]["num_trained_tokens"] > 0

    blobs = ft.app.state.blobs
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors"):
        with blobs.writer(f"exports/one/{name}") as w:
            w.write((tiny_folder / name).read_bytes())
    catalog.add(ModelEntry(name="me/exported", source_kind="output", source="exports/one"))
    catalog.add(ModelEntry(name="me/empty", source_kind="output", source="exports/none"))
    assert _ok(ft, model="me/exported", training_file=file_id, top_k=1)["rows"][0]["num_trained_tokens"] > 0
    _refused(ft, 409, "model", "tokenizer.json", model="me/empty", training_file=file_id)

    catalog.add(ModelEntry(name="local/bare", source_kind="local", source=str(ft.settings.home / "nowhere")))
    _refused(ft, 409, "model", "tokenizer.json", model="local/bare", training_file=file_id)


# -- refusals ------------------------------------------------------------------------------------------------------


def test_bad_requests_name_their_parameter(ft: Any, models: Path) -> None:
    file_id = ft.upload(CONVERSATIONS)
    _refused(ft, 404, "model", "not found", model="nobody/nothing", training_file=file_id)
    _refused(ft, 400, "model", "required", model=" ", training_file=file_id)
    _refused(ft, 400, "model", training_file=file_id)  # missing altogether
    _refused(ft, 400, "training_file", model=TINY)
    _refused(ft, 400, "training_file", "required", model=TINY, training_file="")
    for top_k in (0, -1, 51):
        _refused(ft, 400, "top_k", "between 1 and 50", model=TINY, training_file=file_id, top_k=top_k)
    _refused(ft, 400, "top_k", model=TINY, training_file=file_id, top_k="many")
    for method in ("dpo", "rl"):
        _refused(ft, 400, "training_method", "sft", model=TINY, training_file=file_id, training_method=method)
    for value in ("yes", "auto", 1):
        _refused(ft, 400, "train_on_inputs", model=TINY, training_file=file_id, train_on_inputs=value)
    assert _ok(ft, model=TINY, training_file=file_id, training_method="SFT", top_k=None)["rows"]


def test_files_that_cannot_be_previewed_name_training_file(ft: Any, models: Path) -> None:
    file_id = ft.upload(CONVERSATIONS)
    nobody = "file-00000000-0000-0000-0000-000000000000"
    _refused(ft, 404, "training_file", "not found", model=TINY, training_file=nobody)
    bobs = ft.upload(CONVERSATIONS, who="bob")
    _refused(ft, 404, "training_file", "not found", model=TINY, training_file=bobs)
    assert _ok(ft, who="bob", model=TINY, training_file=bobs, top_k=1)["rows"]

    bad = ft.upload([{"messages": [{"role": "bot", "content": "x"}]}], name="bad.jsonl", expect="INVALID_FORMAT")
    _refused(ft, 400, "training_file", "invalid", model=TINY, training_file=bad)
    prefs = ft.upload(ft.preferences, name="prefs.jsonl")
    _refused(ft, 400, "training_file", "SFT", model=TINY, training_file=prefs)
    with ft.app.state.db.session() as s:
        files_repo.set_processing(s, file_id=file_id, status="RUNNING")
    _refused(ft, 400, "training_file", "still being checked", model=TINY, training_file=file_id)

    opened = ft.open_upload(b'{"text": "never sent"}\n')
    _refused(ft, 400, "training_file", "not ready", "PUT", model=TINY, training_file=opened)

    r = ft.client.delete(f"/v1/files/{bobs}", headers=ft.bob)
    assert r.status_code == 200, r.text
    _refused(ft, 404, "training_file", who="bob", model=TINY, training_file=bobs)
