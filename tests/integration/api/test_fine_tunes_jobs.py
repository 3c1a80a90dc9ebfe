"""A job after creation (api-contract 3.5-3.9): list, retrieve, cancel, delete, events, checkpoints and metrics,
each parsed with the real SDK's models, and never visible to another owner."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from together.types import (
    FinetuneResponse,
    FineTuningCancelResponse,
    FineTuningListCheckpointsResponse,
    FineTuningListEventsResponse,
    FineTuningListMetricsResponse,
    FineTuningListResponse,
)

from tuneforge.storage.layout import final_prefix, job_prefix
from tuneforge.store import jobs as repo

LORA = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_trainable_modules": "all-linear", "type": "Lora"}


def test_the_real_sdk_drives_every_call(ft, train_file) -> None:
    client = ft.sdk()
    job = client.fine_tuning.create(training_file=train_file, model=ft.model, lora=True, suffix="sdk")
    assert job.output_name == f"alice/SmolLM2-135M-Instruct-sdk-{job.id[3:9]}"
    ft.finish(job.id)
    got = client.fine_tuning.retrieve(job.id)
    assert got.status == "completed" and got.x_model_output_name == job.output_name and len(got.events) == 5
    assert [j.id for j in client.fine_tuning.list().data] == [job.id]
    assert client.fine_tuning.list_events(job.id).data[-1].type == "job_complete"
    kinds = [c.checkpoint_type for c in client.fine_tuning.list_checkpoints(job.id).data]
    assert kinds == ["Final Merged", "Final Adapter", "Intermediate"]
    assert client.fine_tuning.list_metrics(job.id, resolution=3).metrics
    assert client.fine_tuning.model_limits(model_name=job.id).lora_training.default_rank == 8
    assert client.fine_tuning.content(ft_id=job.id, checkpoint="adapter").read()[:2] == b"\x1f\x8b"
    assert client.fine_tuning.retrieve_tokenized_dataset(job.id).size > 0
    assert "deleted" in (client.fine_tuning.delete(job.id).message or "")


def test_list_and_retrieve_shapes(ft, train_file) -> None:
    first = ft.create(ft.sdk_body(train_file))
    second = ft.create(ft.sdk_body(train_file, n_epochs=2, training_type=LORA))
    assert second["queue_depth"] == 1
    listed = ft.client.get("/v1/fine-tunes", headers=ft.alice).json()
    assert [j["id"] for j in listed["data"]] == [first["id"], second["id"]]
    assert all(j["events"] is None and isinstance(j["total_price"], int) for j in listed["data"])
    FineTuningListResponse.model_validate(listed)

    ft.finish(first["id"], status="error")
    body = ft.client.get(f"/v1/fine-tunes/{first['id']}", headers=ft.alice).json()
    assert body["status"] == "error" and body["error"] == "boom: the run failed" and body["queue_depth"] is None
    assert body["events"][-1]["type"] == "job_error" and body["token_count"] == 1000
    assert body["total_price"] == round(1000 * 1 * 2e-6 * 1e9)  # tokens x epochs x price, in nano-dollars
    assert body["model_output_path"] is None and body["steps_completed"] == 20
    parsed = FinetuneResponse.model_validate(body)
    assert parsed.progress is not None and parsed.progress.estimate_available is True
    assert ft.client.get(f"/v1/fine-tunes/{second['id']}", headers=ft.alice).json()["queue_depth"] == 0


def test_another_owner_sees_nothing(ft, train_file) -> None:
    job = ft.create(ft.sdk_body(train_file))
    ft.finish(job["id"])
    jid = job["id"]
    for method, path in [
        ("GET", f"/v1/fine-tunes/{jid}"),
        ("POST", f"/v1/fine-tunes/{jid}/cancel"),
        ("DELETE", f"/v1/fine-tunes/{jid}"),
        ("GET", f"/v1/fine-tunes/{jid}/events"),
        ("GET", f"/v1/fine-tunes/{jid}/checkpoints"),
        ("GET", f"/v1/fine-tunes/{jid}/metrics"),
        ("GET", f"/v1/fine-tunes/{jid}/download-tokenized-dataset"),
        ("GET", f"/v1/finetune/download?ft_id={jid}&checkpoint=merged"),
        ("GET", f"/v1/fine-tunes/models/limits?model_name={jid}"),
        ("GET", f"/v1/fine-tunes/models/limits?model_name={job['model_output_name']}"),
    ]:
        r = ft.client.request(method, path, headers=ft.bob)
        assert r.status_code == 404, (path, r.text)
    assert ft.client.get("/v1/fine-tunes", headers=ft.bob).json() == {"data": []}
    assert ft.client.get(f"/v1/fine-tunes/{jid}", headers=ft.alice).status_code == 200


def test_cancel(ft, train_file, recording_worker) -> None:
    queued = ft.create(ft.sdk_body(train_file, wandb_key="wandb-key-to-forget"))
    with ft.app.state.db.session() as s:
        assert repo.job_secrets(s, repo.get_job(s, job_id=queued["id"])) == {"wandb_key": "wandb-key-to-forget"}
    body = ft.client.post(f"/v1/fine-tunes/{queued['id']}/cancel", headers=ft.alice).json()
    assert body["status"] == "cancelled"
    with ft.app.state.db.session() as s:
        assert repo.get_job(s, job_id=queued["id"]).secrets == {}  # an ended job keeps no key
    FineTuningCancelResponse.model_validate(body)
    events = ft.client.get(f"/v1/fine-tunes/{queued['id']}/events", headers=ft.alice).json()["data"]
    assert [e["type"] for e in events][-2:] == ["cancel_requested", "job_stopped"]
    r = ft.client.post(f"/v1/fine-tunes/{queued['id']}/cancel", headers=ft.alice)
    assert r.status_code == 400 and "already cancelled" in r.json()["error"]["message"]

    running = ft.create(ft.sdk_body(train_file, n_epochs=2))
    with ft.app.state.db.session() as s:
        repo.transition(
            s,
            job_id=running["id"],
            from_statuses=("queued",),
            to_status="running",
            event_type="job_start",
            message="Job started",
        )
    body = ft.client.post(f"/v1/fine-tunes/{running['id']}/cancel", headers=ft.alice).json()
    assert body["status"] == "cancel_requested" and recording_worker.cancels == [running["id"]]
    again = ft.client.post(f"/v1/fine-tunes/{running['id']}/cancel", headers=ft.alice)
    assert again.status_code == 200 and again.json()["status"] == "cancel_requested"
    assert recording_worker.cancels == [running["id"]]


def test_delete_only_finished_jobs(ft, train_file) -> None:
    job = ft.create(ft.sdk_body(train_file))
    r = ft.client.delete(f"/v1/fine-tunes/{job['id']}", headers=ft.alice)
    assert r.status_code == 409 and "cancel it first" in r.json()["error"]["message"]
    ft.finish(job["id"])
    blobs = ft.app.state.blobs
    assert blobs.list(job_prefix(job["id"]))
    r = ft.client.delete(f"/v1/fine-tunes/{job['id']}?force=false", headers=ft.alice)
    assert r.status_code == 200 and "deleted" in r.json()["message"]
    assert not blobs.list(job_prefix(job["id"]))
    assert ft.client.get(f"/v1/fine-tunes/{job['id']}", headers=ft.alice).status_code == 404
    assert ft.client.get("/v1/fine-tunes", headers=ft.alice).json()["data"] == []


def test_events_carry_their_data_but_no_secrets(ft, train_file) -> None:
    job = ft.create(ft.sdk_body(train_file))
    with ft.app.state.db.session() as s:
        repo.add_event(
            s,
            job_id=job["id"],
            type_="training_start",
            message="Training started",
            data={
                "total_steps": 40,
                "token_count": 1234,
                "param_count": 135,
                "wandb_key": "nope",
                "hf_api_token": "nope",
            },
        )
    events = ft.client.get(f"/v1/fine-tunes/{job['id']}/events", headers=ft.alice).json()
    last = events["data"][-1]
    assert last["total_steps"] == 40 and last["token_count"] == 1234 and last["object"] == "fine-tune-event"
    assert "wandb_key" not in last and "hf_api_token" not in last
    assert all(e["created_at"].endswith("Z") for e in events["data"])
    FineTuningListEventsResponse.model_validate(events)


def test_every_event_type_reaches_a_strict_client_as_a_member_of_the_sdks_enum(ft, train_file) -> None:
    """Evaluations (which the SDK's generated enum lacks) show as epoch_complete with their own name alongside; a
    type this version does not know (written by a newer trainer, say) shows as a warning, never as itself."""
    job = ft.create(ft.sdk_body(train_file))
    with ft.app.state.db.session() as s:
        for type_ in ("epoch_complete", "eval_complete", "from_the_future"):
            repo.add_event(s, job_id=job["id"], type_=type_, message=type_, data={"step": 3})
    events = ft.sdk().fine_tuning.list_events(job["id"]).data  # strict response validation
    shown = [(e.type, e.message, getattr(e, "tuneforge_type", None)) for e in events][-3:]
    assert shown == [
        ("epoch_complete", "epoch_complete", None),
        ("epoch_complete", "eval_complete", "eval_complete"),
        ("warning", "from_the_future", "from_the_future"),
    ]


def test_checkpoints_by_training_type(ft, train_file) -> None:
    lora = ft.create(ft.sdk_body(train_file))
    ft.finish(lora["id"], intermediate=(5, 10))
    data = ft.client.get(f"/v1/fine-tunes/{lora['id']}/checkpoints", headers=ft.alice).json()
    FineTuningListCheckpointsResponse.model_validate(data)
    rows = [(c["checkpoint_type"], c["step"], c["checkpoint"]) for c in data["data"]]
    assert rows == [
        ("Final Merged", 20, "model"),
        ("Final Adapter", 20, "adapter"),
        ("Intermediate", 10, "adapter"),
        ("Intermediate", 5, "adapter"),
    ]
    assert data["data"][1]["path"] == final_prefix(lora["id"], "adapter")

    unmerged = ft.create(ft.sdk_body(train_file, n_epochs=2))
    ft.finish(unmerged["id"], merged=False, intermediate=())
    data = ft.client.get(f"/v1/fine-tunes/{unmerged['id']}/checkpoints", headers=ft.alice).json()
    assert [c["checkpoint_type"] for c in data["data"]] == ["Final Adapter"]

    full = ft.create(ft.sdk_body(train_file, training_type={"type": "Full"}))
    ft.finish(full["id"], full=True)
    data = ft.client.get(f"/v1/fine-tunes/{full['id']}/checkpoints", headers=ft.alice).json()
    assert [(c["checkpoint_type"], c["checkpoint"]) for c in data["data"]] == [
        ("Final", "model"),
        ("Intermediate", "model"),
    ]
    running = ft.create(ft.sdk_body(train_file, n_epochs=3))
    assert ft.client.get(f"/v1/fine-tunes/{running['id']}/checkpoints", headers=ft.alice).json() == {"data": []}


def test_metrics_filters_and_resolution(ft, train_file) -> None:
    job = ft.create(ft.sdk_body(train_file))
    ft.finish(job["id"], steps=20)
    url = f"/v1/fine-tunes/{job['id']}/metrics"
    every = ft.client.get(url, headers=ft.alice).json()
    FineTuningListMetricsResponse.model_validate(every)
    assert len(every["metrics"]) == 24 and all("train/global_step" in m for m in every["metrics"])
    assert isinstance(every["metrics"][0]["train/global_step"], int)

    thin = ft.client.get(url, params={"resolution": 5}, headers=ft.alice).json()["metrics"]
    train = [m["train/global_step"] for m in thin if "train/loss" in m]
    evals = [m["train/global_step"] for m in thin if "eval/loss" in m]
    assert train == [1, 5, 10, 15, 20] and evals == [5, 10, 15, 20]
    assert [m["train/global_step"] for m in thin] == sorted(m["train/global_step"] for m in thin)

    window = ft.client.get(url, params={"global_step_from": 5, "global_step_to": 6}, headers=ft.alice).json()
    assert [m["train/global_step"] for m in window["metrics"]] == [5, 5, 6]
    with ft.app.state.db.session() as s:
        rows = repo.list_metrics(s, job_id=job["id"])
    between = (rows[-2].logged_at + rows[-1].logged_at) / 2
    cut = datetime.fromtimestamp(between, tz=UTC).isoformat().replace("+00:00", "Z")
    late = ft.client.get(url, params={"logged_at_from": cut}, headers=ft.alice).json()["metrics"]
    assert late == [{"eval/loss": 0.15, "train/global_step": 20}]
    r = ft.client.get(url, params={"logged_at_to": "yesterday"}, headers=ft.alice)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logged_at_to"


@pytest.mark.parametrize("resolution", [0, -8])
def test_a_non_positive_resolution_thins_nothing(ft, train_file, resolution: int) -> None:
    job = ft.create(ft.sdk_body(train_file))
    ft.finish(job["id"], steps=6)
    r = ft.client.get(f"/v1/fine-tunes/{job['id']}/metrics", params={"resolution": resolution}, headers=ft.alice)
    assert len(r.json()["metrics"]) == 7


def test_a_file_a_live_job_reads_cannot_be_deleted_until_the_job_ends(ft, train_file) -> None:
    job = ft.create(ft.sdk_body(train_file))
    r = ft.client.delete(f"/v1/files/{train_file}", headers=ft.alice)
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert job["id"] in error["message"] and "cancel" in error["message"], error
    assert r.headers.get("x-should-retry") == "false"  # the SDK would retry a bare 409
    # Nothing half-done: the file is still listed, readable and usable.
    assert ft.client.get(f"/v1/files/{train_file}", headers=ft.alice).status_code == 200
    assert ft.client.get(f"/v1/files/{train_file}/content", headers=ft.alice).content
    second = ft.create(ft.sdk_body(train_file, suffix="again"))
    for j in (job, second):
        assert ft.client.post(f"/v1/fine-tunes/{j['id']}/cancel", headers=ft.alice).json()["status"] == "cancelled"
    r = ft.client.delete(f"/v1/files/{train_file}", headers=ft.alice)
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text
    assert ft.client.get(f"/v1/files/{train_file}", headers=ft.alice).status_code == 404
