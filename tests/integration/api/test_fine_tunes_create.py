"""`POST /fine-tunes`: the SDK's exact bodies, every bad parameter named, idempotent retries,
continuing from checkpoints, and what is stored for the worker."""

from __future__ import annotations

import json
from typing import Any

import pytest
import together
from huggingface_hub import constants as hf_constants
from together.lib.types.fine_tuning import FinetuneResponse as HandWrittenResponse
from together.types import FinetuneResponse

from tuneforge.catalog.entries import SMOLLM2, ModelEntry, ModelLimits
from tuneforge.jobs.stored_plan import plan_of
from tuneforge.storage.layout import checkpoint_prefix, final_prefix
from tuneforge.store import files as files_repo
from tuneforge.store import jobs as repo
from tuneforge.store.tables import JobRow
from tuneforge.train import registry
from tuneforge.train.spec import PLAN_VERSION

MODEL = SMOLLM2.name
LORA = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_trainable_modules": "all-linear", "type": "Lora"}
DPO = {
    "method": "dpo",
    "dpo_beta": 0.1,
    "dpo_normalize_logratios_by_length": True,
    "dpo_reference_free": True,
    "rpo_alpha": 0.5,
    "simpo_gamma": 0.2,
}


def _row(ft: Any, job_id: str) -> JobRow:
    with ft.app.state.db.session() as s:
        return repo.get_job(s, job_id=job_id)


def _add_models(ft: Any) -> None:
    catalog = ft.app.state.catalog
    if catalog.find("test/plain") is None:
        catalog.add(
            ModelEntry(
                name="test/plain",
                source_kind="local",
                source="/m/plain",
                limits=ModelLimits(supports_full=False, supports_tools=False, supports_dpo=False),
            )
        )
        catalog.add(
            ModelEntry(
                name="test/vision",
                source_kind="hub",
                source="org/vision-repo",
                limits=ModelLimits(supports_vision=True),
            )
        )


def test_the_sdk_default_body_queues_a_lora_job(ft, train_file: str, recording_worker) -> None:
    worker = recording_worker
    job = ft.create(ft.sdk_body(train_file, suffix="my-run_1"))
    assert job["status"] == "queued" and job["user_id"] == "alice" and job["queue_depth"] == 0
    assert job["model"] == MODEL and job["training_file"] == train_file and job["validation_file"] is None
    short = job["id"].removeprefix("ft-")[:6]
    assert job["model_output_name"] == f"alice/SmolLM2-135M-Instruct-my-run_1-{short}"
    assert job["training_type"] == LORA and job["training_method"] == {"method": "sft", "train_on_inputs": "auto"}
    assert job["trainingfile_numlines"] == job["TrainingFileNumLines"] == len(ft.conversations)
    assert job["total_price"] == 0 and job["progress"] == {"estimate_available": False, "seconds_remaining": 0}
    assert job["created_at"].endswith("Z") and len(job["created_at"]) == len("2024-01-01T00:00:00.000000Z")
    assert "events" not in job or job["events"] is None
    assert worker.wakes == 1
    # Both SDK models parse it with validation: the sync create reads the hand-written one.
    lib = HandWrittenResponse.model_validate(job)
    assert lib.output_name == job["model_output_name"] and lib.training_file_num_lines == len(ft.conversations)
    assert FinetuneResponse.model_validate(job).x_model_output_name == job["model_output_name"]

    plan = plan_of(_row(ft, job["id"]))
    hyper = plan.hyper
    assert plan.version == PLAN_VERSION and plan.training_file == train_file
    assert hyper.training_type == "lora" and hyper.lora_r == 8 and hyper.alpha == 16
    assert hyper.batch_size == "max" and hyper.max_seq_length == 8192 and hyper.seed == 42
    assert hyper.lora_target_modules == "all-linear" and hyper.train_on_inputs == "auto"
    assert plan.method == "sft" and plan.training_file_type == "jsonl" and plan.init is None
    assert plan.model_source.source_kind == "gguf-package"
    with ft.app.state.db.session() as s:
        events = repo.list_events(s, job_id=job["id"])
    assert [(e.type, e.message) for e in events] == [
        ("job_pending", "Fine-tune job created"),
        ("job_pending", "Job queued, 0 ahead"),
    ]


def test_lora_full_and_dpo_bodies(ft, train_file: str) -> None:
    lora = ft.create(
        ft.sdk_body(
            train_file,
            training_type=LORA | {"lora_r": 16, "lora_alpha": 32, "lora_trainable_modules": "q_proj,v_proj"},
            learning_rate=0.001,
            batch_size=8,
        )
    )
    assert lora["training_type"]["lora_r"] == 16 and lora["batch_size"] == 8 and lora["learning_rate"] == 0.001
    assert _row(ft, lora["id"]).params["hyper"]["lora_target_modules"] == ["q_proj", "v_proj"]
    assert plan_of(_row(ft, lora["id"])).hyper.lora_target_modules == ["q_proj", "v_proj"]
    full = ft.create(ft.sdk_body(train_file, training_type={"type": "Full"}))
    assert full["training_type"] == {"type": "Full"} and plan_of(_row(ft, full["id"])).hyper.training_type == "full"
    FinetuneResponse.model_validate(full)
    HandWrittenResponse.model_validate(full)


def test_dpo_on_preference_data_is_accepted_with_its_knobs(ft) -> None:
    prefs = ft.upload(ft.preferences, name="prefs.jsonl")
    job = ft.create(ft.sdk_body(prefs, training_method=DPO))
    assert job["training_method"]["method"] == "dpo"
    hyper = plan_of(_row(ft, job["id"])).hyper
    assert plan_of(_row(ft, job["id"])).method == "dpo"
    assert (hyper.dpo_beta, hyper.dpo_normalize_logratios_by_length, hyper.dpo_reference_free) == (0.1, True, True)


def test_a_method_that_no_recipe_implements_is_refused_at_create(ft, monkeypatch) -> None:
    """A method in the contract and in the model's limits that no recipe on this server trains (the registry
    reserves its name): refused before any job."""
    monkeypatch.setitem(registry.RECIPES, "dpo", None)
    prefs = ft.upload(ft.preferences, name="prefs-reserved.jsonl")
    with ft.app.state.db.session() as s:
        before = len(repo.list_jobs(s, owner="alice"))
    r = ft.client.post("/v1/fine-tunes", json=ft.sdk_body(prefs, training_method=DPO), headers=ft.alice)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "training_method.method" and "dpo" in error["message"] and "sft" in error["message"]
    with ft.app.state.db.session() as s:
        assert len(repo.list_jobs(s, owner="alice")) == before


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('"max_grad_norm": Infinity', "max_grad_norm"),
        ('"max_grad_norm": -Infinity', "max_grad_norm"),
        ('"learning_rate": NaN', "learning_rate"),
        ('"weight_decay": 1e999', "weight_decay"),
        ('"suffix": "a\\u0000b"', "suffix"),
        ('"wandb_project_name": "p\\u0000"', "wandb_project_name"),
        ('"suffix": "\\udc80"', "suffix"),
    ],
)
def test_non_finite_numbers_and_nul_characters_are_refused_by_name(ft_shared, raw: str, param: str) -> None:
    """Python's json (and so many clients) writes Infinity and NaN; a NUL or a lone surrogate can't be stored."""
    body = ft_shared.sdk_body(ft_shared.upload(ft_shared.conversations))
    body.pop(param, None)
    text = json.dumps(body)[:-1] + ", " + raw + "}"
    r = ft_shared.client.post("/v1/fine-tunes", content=text.encode(), headers=ft_shared.alice
                              | {"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"], error


def test_secrets_are_kept_but_never_shown(ft, train_file: str) -> None:
    job = ft.create(
        ft.sdk_body(train_file, wandb_key="wandb-secret-42", wandb_project_name="proj", hf_api_token="hf_secret_42")
    )
    assert job["wandb_project_name"] == "proj"
    row = _row(ft, job["id"])
    assert "secret" not in json.dumps(row.secrets)  # stored sealed, with a key kept outside the database
    with ft.app.state.db.session() as s:
        assert repo.job_secrets(s, row) == {"wandb_key": "wandb-secret-42", "hf_api_token": "hf_secret_42"}
    assert (ft.settings.home / "secrets.key").stat().st_mode & 0o777 == 0o600
    assert ft.settings.home.stat().st_mode & 0o777 == 0o700
    if ft.settings.database_url.startswith("sqlite"):  # the file's bytes (PostgreSQL's files are its server's)
        db_files = [p for p in ft.settings.home.iterdir() if p.name.startswith("tuneforge.db")]
        assert db_files and all(b"secret_42" not in p.read_bytes() and b"secret-42" not in p.read_bytes()
                                for p in db_files)  # fmt: skip
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in db_files)
    for path in (f"/v1/fine-tunes/{job['id']}", "/v1/fine-tunes", f"/v1/fine-tunes/{job['id']}/events"):
        text = ft.client.get(path, headers=ft.alice).text
        assert "secret_42" not in text and "secret-42" not in text


def test_a_retried_post_returns_the_same_job(ft, train_file: str) -> None:
    body = ft.sdk_body(train_file)
    first, second = ft.create(body), ft.create(body)
    assert first["id"] == second["id"]
    assert ft.create(ft.sdk_body(train_file, n_epochs=2))["id"] != first["id"]
    assert ft.create(body, who="alice")["id"] == first["id"]
    ft.app.state.settings.duplicate_job_window_s = 0.0
    assert ft.create(body)["id"] != first["id"]
    assert len(ft.client.get("/v1/fine-tunes", headers=ft.alice).json()["data"]) == 3


def test_a_repeat_of_a_cancelled_or_deleted_job_makes_a_new_one(ft, train_file: str) -> None:
    """Within the retry window an identical body is a retry, unless the job it made was cancelled or deleted since:
    then the user asks again on purpose."""
    body = ft.sdk_body(train_file)
    first = ft.create(body)
    assert ft.client.post(f"/v1/fine-tunes/{first['id']}/cancel", headers=ft.alice).json()["status"] == "cancelled"
    second = ft.create(body)
    assert second["id"] != first["id"] and second["status"] == "queued"
    assert ft.create(body)["id"] == second["id"]  # and a retry of that one is a retry again
    ft.client.post(f"/v1/fine-tunes/{second['id']}/cancel", headers=ft.alice)
    assert ft.client.delete(f"/v1/fine-tunes/{second['id']}", headers=ft.alice).status_code == 200
    third = ft.create(body)
    assert third["id"] not in (first["id"], second["id"])
    assert ft.client.get(f"/v1/fine-tunes/{third['id']}", headers=ft.alice).status_code == 200


BAD: list[tuple[str, dict[str, Any]]] = [
    ("n_epochs", {"n_epochs": 0}),
    ("n_epochs", {"n_epochs": 21}),
    ("n_checkpoints", {"n_checkpoints": 0}),
    ("n_checkpoints", {"n_checkpoints": 21}),
    ("n_evals", {"n_evals": 101}),
    ("n_evals", {"n_evals": 2}),
    ("learning_rate", {"learning_rate": 0.5}),
    ("learning_rate", {"learning_rate": 1e-9}),
    ("batch_size", {"batch_size": 0}),
    ("batch_size", {"batch_size": 65, "training_type": LORA}),
    ("batch_size", {"batch_size": 33, "training_type": {"type": "Full"}}),
    ("batch_size", {"batch_size": "huge"}),
    ("max_seq_length", {"max_seq_length": 16}),
    ("max_seq_length", {"max_seq_length": 9000}),
    ("warmup_ratio", {"warmup_ratio": -0.1}),
    ("warmup_ratio", {"warmup_ratio": 1.5}),
    ("max_grad_norm", {"max_grad_norm": -1}),
    ("weight_decay", {"weight_decay": -0.1}),
    ("lr_scheduler.lr_scheduler_type", {"lr_scheduler": {"lr_scheduler_type": "step"}}),
    (
        "lr_scheduler.lr_scheduler_args.min_lr_ratio",
        {"lr_scheduler": {"lr_scheduler_type": "linear", "lr_scheduler_args": {"min_lr_ratio": 1.5}}},
    ),
    (
        "lr_scheduler.lr_scheduler_args.num_cycles",
        {"lr_scheduler": {"lr_scheduler_type": "cosine", "lr_scheduler_args": {"min_lr_ratio": 0, "num_cycles": 0}}},
    ),
    ("training_type.lora_r", {"training_type": LORA | {"lora_r": 0}}),
    ("training_type.lora_r", {"training_type": LORA | {"lora_r": 65}}),
    ("training_type.lora_alpha", {"training_type": LORA | {"lora_alpha": 0}}),
    ("training_type.lora_dropout", {"training_type": LORA | {"lora_dropout": 1.0}}),
    ("training_type.lora_trainable_modules", {"training_type": LORA | {"lora_trainable_modules": "q_proj,lm_x"}}),
    ("training_type.type", {"training_type": {"type": "Adapter"}}),
    ("training_method.method", {"training_method": {"method": "ppo"}}),
    ("training_method.train_on_inputs", {"training_method": {"method": "sft", "train_on_inputs": "yes"}}),
    ("training_method.dpo_beta", {"training_method": {"method": "sft", "dpo_beta": 0.1}}),
    ("suffix", {"suffix": "x" * 41}),
    ("suffix", {"suffix": "has space"}),
    ("early_stopping_enabled", {"early_stopping_enabled": True}),
    ("early_stopping_patience", {"early_stopping_enabled": True, "early_stopping_patience": 0}),
    ("model", {"from_checkpoint": "ft-00000000-0000-0000-0000-000000000000"}),
    ("model", {"model": None}),
    ("from_hf_model", {"from_hf_model": "not a repo id"}),
    ("hf_model_revision", {"hf_model_revision": "main"}),
    ("multimodal_params.train_vision", {"multimodal_params": {"train_vision": True}}),
    ("random_seed", {"random_seed": -1}),
    ("gradient_accumulation_steps", {"gradient_accumulation_steps": -2}),
    ("gradient_accumulation_steps", {"gradient_accumulation_steps": 0}),
    ("wandb_base_url", {"wandb_base_url": "http://127.0.0.1:9/", "wandb_api_key": "k" * 40}),
    ("wandb_base_url", {"wandb_base_url": "https://api.wandb.ai.example.org"}),
    ("training_file", {"training_file": ""}),
    ("training_type", {"model": "test/plain", "training_type": {"type": "Full"}}),
    ("training_method.method", {"model": "test/plain", "training_method": DPO}),
    ("training_file", {"training_method": DPO}),  # conversations, not preference pairs
]


@pytest.mark.parametrize(("param", "changes"), BAD, ids=[f"{p}:{i}" for i, (p, _) in enumerate(BAD)])
def test_each_bad_parameter_is_named(ft_shared, param: str, changes: dict[str, Any]) -> None:
    _add_models(ft_shared)
    body = ft_shared.sdk_body(ft_shared.upload(ft_shared.conversations), **changes)
    r = ft_shared.client.post("/v1/fine-tunes", json=body, headers=ft_shared.alice)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param), error
    assert param.rsplit(".", 1)[-1] in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_files_must_suit_the_method_and_the_model(ft_shared) -> None:
    _add_models(ft_shared)
    prefs = ft_shared.upload(ft_shared.preferences, name="prefs.jsonl")
    tools = ft_shared.upload([ft_shared.tools_line], name="tools.jsonl")
    cases = [
        (ft_shared.sdk_body(prefs), "training_file", "SFT"),
        (
            ft_shared.sdk_body(ft_shared.upload(ft_shared.conversations), validation_file=prefs),
            "validation_file",
            "SFT",
        ),
        (ft_shared.sdk_body(tools, model="test/plain"), "training_file", "tool"),
    ]
    for body, param, words in cases:
        r = ft_shared.client.post("/v1/fine-tunes", json=body, headers=ft_shared.alice)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.text, r.text


def test_all_problems_are_reported_at_once(ft_shared) -> None:
    body = ft_shared.sdk_body(
        ft_shared.upload(ft_shared.conversations),
        n_epochs=0,
        learning_rate=5,
        batch_size=1000,
        suffix="a b",
        warmup_ratio=2,
        training_type=LORA | {"lora_r": 999},
    )
    r = ft_shared.client.post("/v1/fine-tunes", json=body, headers=ft_shared.alice)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    for name in ("n_epochs", "learning_rate", "batch_size", "suffix", "warmup_ratio", "lora_r"):
        assert name in message, message


def test_files_not_checked_or_invalid(ft, train_file: str) -> None:
    bad = ft.upload([{"messages": [{"role": "bot", "content": "x"}]}], name="bad.jsonl", expect="INVALID_FORMAT")
    r = ft.client.post("/v1/fine-tunes", json=ft.sdk_body(bad), headers=ft.alice)
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file" and "invalid" in r.text
    with ft.app.state.db.session() as s:
        files_repo.set_processing(s, file_id=train_file, status="RUNNING")
    r = ft.client.post("/v1/fine-tunes", json=ft.sdk_body(train_file), headers=ft.alice)
    assert r.status_code == 400 and "still being checked" in r.json()["error"]["message"]


def test_unknown_model_file_or_parent_is_404(ft, train_file: str) -> None:
    bobs = ft.upload(ft.conversations[:2], who="bob")
    cases = [
        (ft.sdk_body(train_file, model="nobody/nothing"), "model"),
        (ft.sdk_body("file-00000000-0000-0000-0000-000000000000"), "training_file"),
        (ft.sdk_body(bobs), "training_file"),
        (ft.sdk_body(train_file, validation_file=bobs), "validation_file"),
        (
            {**ft.sdk_body(train_file, from_checkpoint="ft-00000000-0000-0000-0000-000000000000:5"), "model": None},
            "from_checkpoint",
        ),
    ]
    for body, param in cases:
        body = {k: v for k, v in body.items() if v is not None}
        r = ft.client.post("/v1/fine-tunes", json=body, headers=ft.alice)
        assert r.status_code == 404 and r.json()["error"]["param"] == param, r.text


def test_a_file_whose_upload_never_finished_is_400_naming_it(ft, train_file: str) -> None:
    """The caller owns the file, it is just not ready: 400 naming the parameter, not "not found". The SDK's create
    asks for a price estimate first; that says "not validated" (as for a file still being checked) and lets the SDK
    go on to the create, which refuses with the reason."""
    no_bytes = ft.open_upload(b'{"text": "never sent"}\n')
    no_preprocess = ft.open_upload(b'{"text": "sent, never submitted"}\n', put=True)
    for file_id, how in ((no_bytes, "PUT"), (no_preprocess, "preprocess")):
        for body, param in (
            (ft.sdk_body(file_id), "training_file"),
            (ft.sdk_body(train_file, validation_file=file_id), "validation_file"),
        ):
            r = ft.client.post("/v1/fine-tunes", json=body, headers=ft.alice)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == param and "not ready" in error["message"] and how in error["message"], r.text
        r = ft.client.post(
            "/v1/fine-tunes/estimate-price", json={"training_file": file_id, "model": MODEL}, headers=ft.alice
        )
        assert r.json() == {"estimation_available": False, "unavailable_reason": "train_file_not_validated"}, r.text
        # Another owner still learns nothing about it.
        r = ft.client.post("/v1/fine-tunes", json=ft.sdk_body(file_id), headers=ft.bob)
        assert r.status_code == 404 and r.json()["error"]["param"] == "training_file", r.text

    sdk = ft.sdk()
    with pytest.raises(together.BadRequestError) as refused:
        sdk.fine_tuning.create(training_file=no_bytes, model=MODEL, lora=True)
    assert "training_file" in refused.value.message and "not ready" in refused.value.message


def _continue(ft: Any, train_file: str, ref: str, **changes: Any) -> Any:
    body = {k: v for k, v in ft.sdk_body(train_file, from_checkpoint=ref, **changes).items() if k != "model"}
    return ft.client.post("/v1/fine-tunes", json=body, headers=ft.alice)


def test_from_checkpoint_starts_from_the_parent_weights(ft, train_file: str) -> None:
    parent = ft.create(ft.sdk_body(train_file, training_type=LORA | {"lora_r": 4, "lora_alpha": 8}))
    running = ft.create(ft.sdk_body(train_file, n_epochs=3))
    r = _continue(ft, train_file, running["id"])
    assert r.status_code == 400 and "completed" in r.json()["error"]["message"]
    ft.finish(parent["id"], steps=20, intermediate=(10,))

    final = _continue(ft, train_file, parent["id"]).json()
    assert final["model"] == MODEL and final["from_checkpoint"] == parent["id"]
    assert final["training_type"]["lora_r"] == 4  # inherited with the adapter
    init = _row(ft, final["id"]).params["init"]
    assert init == {"key": final_prefix(parent["id"], "adapter"), "adapter": True, "step": 20}

    step = _continue(ft, train_file, f"{parent['id']}:10", n_epochs=2).json()
    assert _row(ft, step["id"]).params["init"] == {
        "key": checkpoint_prefix(parent["id"], 10),
        "adapter": True,
        "step": 10,
    }
    by_name = _continue(ft, train_file, parent["model_output_name"], n_epochs=3).json()
    assert _row(ft, by_name["id"]).params["init"]["key"] == final_prefix(parent["id"], "adapter")

    full = _continue(ft, train_file, parent["id"], training_type={"type": "Full"}).json()
    assert _row(ft, full["id"]).params["init"] == {
        "key": final_prefix(parent["id"], "merged"),
        "adapter": False,
        "step": 20,
    }
    r = _continue(ft, train_file, f"{parent['id']}:7")
    assert r.status_code == 400 and "step 7" in r.json()["error"]["message"]
    r = _continue(ft, train_file, parent["id"], n_epochs=4, training_type=LORA)
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_type.lora_r"
    bob_body = {
        k: v
        for k, v in ft.sdk_body(ft.upload(ft.conversations, who="bob"), from_checkpoint=parent["id"]).items()
        if k != "model"
    }
    assert ft.client.post("/v1/fine-tunes", json=bob_body, headers=ft.bob).status_code == 404
    # The parent's weights stay while a job continues from them; its output name is not a base model.
    r = ft.client.delete(f"/v1/fine-tunes/{parent['id']}", headers=ft.alice)
    assert r.status_code == 409 and final["id"] in r.json()["error"]["message"]
    as_model = ft.sdk_body(train_file, model=parent["model_output_name"], n_epochs=5)
    r = ft.client.post("/v1/fine-tunes", json=as_model, headers=ft.alice)
    assert r.status_code == 400 and "from_checkpoint" in r.json()["error"]["message"]


def test_hf_models_and_vision_models_from_the_catalog(ft, train_file: str, monkeypatch) -> None:
    _add_models(ft)
    job = ft.create(
        ft.sdk_body(
            train_file,
            model="test/vision",
            from_hf_model="org/vision-repo",
            hf_model_revision="abc123",
            multimodal_params={"train_vision": False},
        )
    )
    assert job["multimodal_params"] == {"train_vision": False} and job["from_hf_model"] == "org/vision-repo"
    source = plan_of(_row(ft, job["id"])).model_source
    assert (source.name, source.source_kind, source.source, source.revision) == (
        "test/vision", "hub", "org/vision-repo", "abc123"
    )  # fmt: skip
    # A vision model trains its vision tower when asked; a text model refuses it, and DPO is for text models.
    tower = ft.create(ft.sdk_body(train_file, model="test/vision", multimodal_params={"train_vision": True}))
    assert tower["multimodal_params"] == {"train_vision": True}
    # A push to the hub needs the job's own token; the refusals name their parameter.
    for model, changes, param in (
        ("test/vision", {"hf_output_repo_name": "me/out"}, "hf_output_repo_name"),
        (MODEL, {"multimodal_params": {"train_vision": True}}, "multimodal_params.train_vision"),
        ("test/vision", {"training_method": {"method": "dpo"}}, "training_method.method"),
    ):
        r = ft.client.post("/v1/fine-tunes", json=ft.sdk_body(train_file, model=model, **changes), headers=ft.alice)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # A repo outside the catalog (bring your own model) is read from the hub before the job is queued: a hub that
    # cannot be reached is a 503 naming from_hf_model, and no job.
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # whatever test modules imported before set
    with ft.app.state.db.session() as s:
        before = len(repo.list_jobs(s, owner="alice"))
    r = ft.client.post("/v1/fine-tunes", json=ft.sdk_body(train_file, from_hf_model="org/elsewhere"), headers=ft.alice)
    assert r.status_code == 503 and r.json()["error"]["param"] == "from_hf_model", r.text
    assert "could not be reached" in r.json()["error"]["message"] and "retry later" in r.json()["error"]["message"]
    with ft.app.state.db.session() as s:
        assert len(repo.list_jobs(s, owner="alice")) == before
