"""Model limits (api-contract 3.2), price estimates (3.3) and the models list (4.3)."""

from __future__ import annotations

from pydantic import TypeAdapter
from together.types import FinetuneModelLimits, FineTuningEstimatePriceResponse, ModelObject

from tuneforge.catalog.entries import ModelEntry, ModelLimits
from tuneforge.catalog.source import safe_name
from tuneforge.store import files as files_repo

ESTIMATE = TypeAdapter(FineTuningEstimatePriceResponse)


def _limits(ft, name: str, headers=None):
    return ft.client.get("/v1/fine-tunes/models/limits", params={"model_name": name}, headers=headers or ft.alice)


def test_limits_of_a_catalog_model_a_job_and_an_output(ft, train_file) -> None:
    body = _limits(ft, ft.model).json()
    parsed = FinetuneModelLimits.model_validate(body)
    assert parsed.lora_training.default_rank == 8 and parsed.max_seq_length_sft == 8192
    assert body["full_training"] == {"min_batch_size": 1, "max_batch_size": 32, "max_batch_size_dpo": 16}

    job = ft.create(ft.sdk_body(train_file))
    for name in (job["id"], f"{job['id']}:10", job["model_output_name"]):
        r = _limits(ft, name)
        assert r.status_code == 200 and r.json()["model_name"] == ft.model, name

    r = _limits(ft, "nobody/nothing")
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert "model" in message and "not found" in message
    assert _limits(ft, job["id"], headers=ft.bob).status_code == 404
    assert _limits(ft, "").status_code == 400

    ft.app.state.catalog.add(
        ModelEntry(name="test/lora-only", source_kind="local", source="/m", limits=ModelLimits(supports_full=False))
    )
    only = _limits(ft, "test/lora-only").json()
    assert only["full_training"] is None and only["supports_full_training"] is False
    FinetuneModelLimits.model_validate(only)


def _estimate(ft, **body):
    r = ft.client.post("/v1/fine-tunes/estimate-price", json=body, headers=ft.alice)
    assert r.status_code == 200, r.text
    ESTIMATE.validate_python(r.json())
    return r.json()


def test_estimates_from_the_sdk_and_the_cli(ft, train_file) -> None:
    method = {"method": "sft", "train_on_inputs": "auto"}
    sdk = _estimate(ft, training_file=train_file, model=ft.model, n_epochs=2, n_evals=0, training_method=method)
    size = ft.client.get(f"/v1/files/{train_file}", headers=ft.alice).json()["bytes"]
    assert sdk["estimation_available"] is True and sdk["allowed_to_proceed"] is True
    assert sdk["estimated_train_token_count"] == 2 * (size // 4)  # no tokenizer on disk: bytes / 4
    assert abs(sdk["estimated_total_price"] - 2 * (size // 4) * 2e-6) < 1e-12
    assert sdk["user_limit"] > 1e6 and "unavailable_reason" not in sdk
    cli = _estimate(
        ft,
        training_file=train_file,
        validation_file=None,
        model=ft.model,
        from_checkpoint="",
        n_epochs=2,
        n_evals=0,
        training_type=None,
        training_method=method,
    )
    assert cli == sdk

    job = ft.create(ft.sdk_body(train_file))
    from_ckpt = _estimate(
        ft,
        training_file=train_file,
        model="",
        from_checkpoint=f"{job['id']}:5",
        n_epochs=1,
        training_method={
            "method": "dpo",
            "dpo_beta": 0,
            "rpo_alpha": 0,
            "simpo_gamma": 0,
            "dpo_normalize_logratios_by_length": False,
            "dpo_reference_free": False,
        },
        training_type={"type": "Lora", "lora_r": 8, "lora_alpha": 16},
    )
    assert from_ckpt["estimated_train_token_count"] == size // 4


def test_why_there_is_no_estimate(ft, train_file) -> None:
    bad = ft.upload([{"messages": [{"role": "bot", "content": "x"}]}], name="bad.jsonl", expect="INVALID_FORMAT")
    base = {"model": ft.model, "n_epochs": 1}
    assert _estimate(ft, training_file=bad, **base) == {
        "estimation_available": False,
        "unavailable_reason": "train_file_invalid",
    }
    assert _estimate(ft, training_file=train_file, validation_file=bad, **base)["unavailable_reason"] == (
        "eval_file_invalid"
    )
    other = ft.upload(ft.conversations[:3], name="other.jsonl")
    with ft.app.state.db.session() as s:
        files_repo.set_processing(s, file_id=other, status="QUEUED")
    assert _estimate(ft, training_file=other, **base)["unavailable_reason"] == "train_file_not_validated"
    assert _estimate(ft, training_file=train_file, validation_file=other, **base)["unavailable_reason"] == (
        "eval_file_not_validated"
    )
    report = ft.client.get(f"/v1/files/{train_file}", headers=ft.alice).json()["validation_report"]
    with ft.app.state.db.session() as s:
        files_repo.set_processing(s, file_id=other, status="COMPLETED", report=report | {"dataset_is_multimodal": True})
    assert _estimate(ft, training_file=other, **base)["unavailable_reason"] == "multimodal_dataset"
    r = ft.client.post("/v1/fine-tunes/estimate-price", json={"training_file": "file-nope", **base}, headers=ft.alice)
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"


def test_an_exact_count_with_the_models_tokenizer(ft, train_file) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    folder = ft.settings.home / "models" / safe_name(ft.model)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text("{}")  # a finished conversion (its last file)
    # "What is 3 plus 3?" is 6 words and marks; the answer is one.
    expected = sum(len(f"What is {i} plus {i} ?".split()) + 1 for i in range(len(ft.conversations)))
    got = _estimate(ft, training_file=train_file, model=ft.model, n_epochs=3)
    assert got["estimated_train_token_count"] == 3 * expected


def test_models_in_both_shapes(ft, train_file) -> None:
    bare = ft.client.get("/v1/models", headers=ft.alice).json()
    assert isinstance(bare, list) and [m["id"] for m in bare] == [ft.model]
    for item in bare:
        ModelObject.model_validate(item)
        assert set(item["pricing"]) >= {"input", "output", "base", "finetune", "hourly"}
    job = ft.create(ft.sdk_body(train_file))
    queued = ft.create(ft.sdk_body(train_file, n_epochs=2))
    ft.finish(job["id"])
    wrapped = ft.client.get("/v1/models", headers={**ft.alice, "User-Agent": "OpenAI/Python 1.50.0"}).json()
    assert wrapped["object"] == "list"
    ids = [m["id"] for m in wrapped["data"]]
    assert job["model_output_name"] in ids and queued["model_output_name"] not in ids
    assert ft.client.get("/v1/models?format=openai", headers=ft.alice).json()["object"] == "list"
    assert [m["id"] for m in ft.client.get("/v1/models", headers=ft.bob).json()] == [ft.model]
    one = ft.client.get(f"/v1/models/{job['model_output_name']}", headers=ft.alice)
    assert one.status_code == 200 and one.json()["owned_by"] == "alice"
    assert ft.client.get(f"/v1/models/{job['model_output_name']}", headers=ft.bob).status_code == 404
    assert [m.id for m in ft.sdk().models.list()] == [ft.model, job["model_output_name"]]
