"""Fine-tuning end to end through the real `together` SDK (2.42) against a live server training tiny models.

One LoRA job (tiny llama) and one full job (tiny qwen3) start together when the module's first test asks for them and
train side by side; the tests then read them: statuses, events, checkpoints, metrics, the job object, and the weight
archives, which must load with transformers / peft, generate, and fit the training answers better than the base
model. Cancelling, deleting, another owner's view and refused requests are checked on the same server.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import together
from e2e_support import LiveServer, jsonl_bytes, opened, unique, wait_processed_sdk, write_jsonl
from ft_support import (
    COMPLETED_LIFECYCLE,
    TERMINAL,
    TINY_LLAMA,
    TINY_QWEN3,
    Watch,
    answer_loss,
    assert_subsequence,
    check_held,
    checkpoints,
    client,
    create_job,
    download,
    event_types,
    events,
    ft_server,
    generate,
    intermediate_steps,
    load_causal_lm,
    logits,
    metrics,
    qa_records,
    skip_without_training,
    train_rows,
    upload_ready,
)
from together import Together

pytestmark = pytest.mark.timeout(240)

ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")
EVENT_LEVELS = {None, "info", "warning", "error", "legacy_info", "legacy_iwarning", "legacy_ierror", ""}
# Status order of a job that completes: never goes back, may skip any but the last.
STATUS_RANK = {"pending": 0, "queued": 0, "running": 1, "compressing": 2, "uploading": 2, "completed": 3}
LORA_EPOCHS, LORA_BATCH, N_EXAMPLES = 3, 2, 8
LORA_STEPS = LORA_EPOCHS * N_EXAMPLES // LORA_BATCH  # batch_size counts examples per step, packed or not
LORA_INTERMEDIATE = LORA_STEPS // 2  # n_checkpoints=2: one halfway, then the final weights


@dataclass
class Dataset:
    file_id: str
    records: list[dict[str, Any]]


@dataclass
class Started:
    lora: Watch
    full: Watch


@pytest.fixture(scope="module")
def ft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with tiny/llama and tiny/qwen3 in its catalog and three training slots; owners alice and bob."""
    skip_without_training()
    with ft_server(tmp_path_factory.mktemp("ft"), owners=("alice", "bob"), slots=3) as server:
        yield server


@pytest.fixture(scope="module")
def alice(ft: LiveServer) -> Together:
    return client(ft, ft.keys["alice"])


@pytest.fixture(scope="module")
def bob(ft: LiveServer) -> Together:
    return client(ft, ft.keys["bob"])


@pytest.fixture(scope="module")
def base_dir(ft: LiveServer) -> Path:
    """The folder tiny/llama was registered from."""
    return ft.home.parent / "models" / "llama"


@pytest.fixture(scope="module")
def data(alice: Together, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    records = qa_records(N_EXAMPLES)
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    return Dataset(file_id=upload_ready(alice, path, records), records=records)


@pytest.fixture(scope="module")
def started(alice: Together, data: Dataset) -> Started:
    """The LoRA and the full job, created back to back (they train side by side)."""
    lora = create_job(alice, data.file_id, n_epochs=LORA_EPOCHS, batch_size=LORA_BATCH, suffix="e2e")
    full = create_job(
        alice, data.file_id, model=TINY_QWEN3, lora=False, n_epochs=2, learning_rate=1e-3, suffix="full", packing=True
    )
    watches = Started(lora=Watch(alice, lora.id), full=Watch(alice, full.id))
    watches.lora.statuses.append(str(lora.status))
    watches.full.statuses.append(str(full.status))
    return watches


def extra(obj: Any, name: str) -> Any:
    """A field the generated SDK model may not declare (it keeps unknown keys as attributes)."""
    return getattr(obj, name, None)


# --- a LoRA job, start to finish ------------------------------------------------------------------------------------


def test_lora_job_runs_to_completion(started: Started, alice: Together, data: Dataset) -> None:
    watch = started.lora
    job = watch.completed(timeout=180)

    seen = watch.statuses
    assert seen[-1] == "completed" and "running" in seen, seen
    assert all(s in STATUS_RANK for s in seen), seen
    ranks = [STATUS_RANK[s] for s in seen]
    assert ranks == sorted(ranks), f"status went backwards: {seen}"

    assert job.model == TINY_LLAMA
    assert job.training_file == data.file_id
    assert job.suffix == "e2e"
    assert job.n_epochs == LORA_EPOCHS and job.learning_rate == pytest.approx(1e-2)
    assert job.training_type is not None and job.training_type.lora_r == 8  # the model's default rank
    assert job.x_model_output_name and "e2e" in job.x_model_output_name
    assert job.x_model_output_path, "a completed job names its output weights"
    # The SDK parses the job's times (ISO-8601 strings on the wire) into aware datetimes.
    assert isinstance(job.created_at, datetime) and job.created_at.tzinfo is not None, job.created_at
    assert isinstance(job.updated_at, datetime) and job.updated_at >= job.created_at, job.updated_at
    assert job.token_count and job.token_count > 0, job.token_count
    assert job.param_count and job.param_count > 0, job.param_count
    assert extra(job, "total_steps") == LORA_STEPS, job
    assert extra(job, "steps_completed") == LORA_STEPS, job
    assert job.progress is not None and isinstance(job.progress.seconds_remaining, int), job.progress
    assert isinstance(job.total_price, int)
    assert job.events and len(job.events) == len(events(alice, job.id))

    evs = events(alice, job.id)
    types = [str(e.type) for e in evs]
    assert_subsequence(types, COMPLETED_LIFECYCLE)
    assert types[-1] == "job_complete", types
    assert "job_error" not in types and "job_restarted" not in types, types
    assert types.count("checkpoint_save") == 1, types  # n_checkpoints=2: one before the final weights
    for e in evs:
        assert isinstance(e.message, str) and e.message.strip(), e
        assert "Traceback" not in e.message, e.message
        assert ISO_RE.match(str(e.created_at)), e.created_at
        assert e.level in EVENT_LEVELS, e.level
    training_start = next(e for e in evs if e.type == "training_start")
    assert "LoRA" in training_start.message and str(LORA_STEPS) in training_start.message, training_start.message


def test_event_times_never_go_back(started: Started, alice: Together) -> None:
    """Events are listed in the order they happened, and their timestamps agree with that order."""
    started.lora.completed(timeout=180)
    evs = events(alice, started.lora.job_id)
    stamps = [str(e.created_at) for e in evs]
    backwards = [
        f"{evs[i - 1].type} {stamps[i - 1]} > {evs[i].type} {stamps[i]}"
        for i in range(1, len(evs))
        if stamps[i] < stamps[i - 1]
    ]
    assert not backwards, f"event timestamps go backwards: {backwards}"


def test_strict_clients_can_read_the_job(ft: LiveServer, started: Started) -> None:
    """Every read of a finished job passes the SDK's strict validation (declared types and enums)."""
    started.lora.completed(timeout=180)
    strict = client(ft, ft.keys["alice"], strict=True)
    job_id = started.lora.job_id
    problems = []
    for name, call in {
        "retrieve": lambda: strict.fine_tuning.retrieve(job_id),
        "list": lambda: strict.fine_tuning.list(),
        "list_events": lambda: strict.fine_tuning.list_events(job_id),
        "list_checkpoints": lambda: strict.fine_tuning.list_checkpoints(job_id),
        "list_metrics": lambda: strict.fine_tuning.list_metrics(job_id),
    }.items():
        try:
            call()
        except together.APIResponseValidationError as exc:
            cause = str(exc.__cause__).splitlines()
            problems.append(f"{name}: {cause[:3]}")
    assert not problems, "strict SDK validation fails:\n" + "\n".join(problems)


def test_lora_job_checkpoints_and_metrics(started: Started, alice: Together) -> None:
    job_id = started.lora.job_id
    started.lora.completed(timeout=180)

    cps = checkpoints(alice, job_id)
    kinds = [cp.checkpoint_type for cp in cps]
    assert "Final Merged" in kinds and "Final Adapter" in kinds, kinds
    assert intermediate_steps(alice, job_id) == [LORA_INTERMEDIATE], kinds
    for cp in cps:
        assert ISO_RE.match(str(cp.created_at)), cp
        assert cp.path and isinstance(cp.step, int), cp
        if "final" in cp.checkpoint_type.lower():
            assert cp.step == LORA_STEPS, cp
    by_type = {cp.checkpoint_type: cp for cp in cps}
    assert by_type["Final Adapter"].checkpoint == "adapter" and by_type["Final Merged"].checkpoint == "model"

    rows = metrics(alice, job_id)
    assert rows and all("train/global_step" in r for r in rows), rows
    train = train_rows(rows)
    assert [int(r["train/global_step"]) for r in train] == list(range(1, LORA_STEPS + 1)), train
    losses = [float(r["train/loss"]) for r in train]
    per_epoch = LORA_STEPS // LORA_EPOCHS
    first, last = sum(losses[:per_epoch]) / per_epoch, sum(losses[-per_epoch:]) / per_epoch
    assert last < first, f"the training loss did not go down: {losses}"
    # The CLI asks for a thinned series (resolution = terminal width - 48); every row keeps its step.
    thinned = alice.fine_tuning.list_metrics(job_id, resolution=4).metrics or []
    assert 0 < len(train_rows(thinned)) <= 4, thinned
    assert all("train/global_step" in r for r in thinned)


def test_lora_downloads_load_and_generate(
    started: Started, alice: Together, data: Dataset, base_dir: Path, tmp_path: Path
) -> None:
    job_id = started.lora.job_id
    started.lora.completed(timeout=180)

    adapter_files = download(alice, tmp_path / "adapter", job_id, checkpoint="adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= set(adapter_files)
    merged_files = download(alice, tmp_path / "merged", job_id, checkpoint="merged")
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(merged_files)
    step_files = download(alice, tmp_path / "step", job_id, checkpoint_step=LORA_INTERMEDIATE)
    assert "adapter_model.safetensors" in step_files, step_files
    for names in (adapter_files, merged_files, step_files):
        assert not [n for n in names if n.split("/")[0] == "resume"], f"optimizer state leaked into {names}"

    base, tok = load_causal_lm(base_dir)
    merged, merged_tok = load_causal_lm(tmp_path / "merged")
    with_adapter, _ = load_causal_lm(base_dir, adapter=tmp_path / "adapter")
    at_step, _ = load_causal_lm(base_dir, adapter=tmp_path / "step")

    # The merged model is the base with the adapter folded in.
    text = "<|im_start|>user\nWhat colour is the zibber fruit?<|im_end|>\n<|im_start|>assistant\n"
    diff = (logits(merged, merged_tok, text) - logits(with_adapter, tok, text)).abs().max()
    assert float(diff) < 1e-3, f"merged and base+adapter disagree by {float(diff)}"
    # Training taught it the answers: they are likelier than under the base model.
    base_loss = answer_loss(base, tok, data.records)
    merged_loss = answer_loss(merged, merged_tok, data.records)
    assert merged_loss < base_loss, (merged_loss, base_loss)
    for model, tokenizer in ((merged, merged_tok), (with_adapter, tok), (at_step, tok)):
        assert isinstance(generate(model, tokenizer, "What colour is the zibber fruit?"), str)


def test_downloads_of_what_does_not_exist_are_refused(started: Started, alice: Together) -> None:
    job_id = started.lora.job_id
    started.lora.completed(timeout=180)
    with pytest.raises(together.NotFoundError) as nf:
        alice.fine_tuning.content(ft_id=job_id, checkpoint_step=LORA_INTERMEDIATE + 1)
    assert "step" in nf.value.message.lower(), nf.value.message
    with pytest.raises(together.BadRequestError) as bad:
        alice.fine_tuning.content(ft_id=job_id, checkpoint="weights")  # type: ignore[arg-type]
    assert "checkpoint" in bad.value.message, bad.value.message


# --- a full fine-tuning job, then deleted ----------------------------------------------------------------------------


def test_full_job_downloads_then_deletes(
    ft: LiveServer, started: Started, alice: Together, data: Dataset, tmp_path: Path
) -> None:
    watch = started.full
    job = watch.completed(timeout=180)
    assert job.model == TINY_QWEN3
    assert job.training_type is not None and getattr(job.training_type, "lora_r", None) is None, job.training_type
    assert_subsequence(event_types(alice, job.id), COMPLETED_LIFECYCLE)
    kinds = [cp.checkpoint_type for cp in checkpoints(alice, job.id)]
    assert not [k for k in kinds if "adapter" in k.lower() or "merged" in k.lower()], kinds
    assert any("final" in k.lower() for k in kinds), kinds

    names = download(alice, tmp_path / "model", job.id, checkpoint="model_output_path")
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(names), names
    default = alice.fine_tuning.content(ft_id=job.id).read()  # no checkpoint: the final model
    assert default[:2] == b"\x1f\x8b"
    with pytest.raises(together.BadRequestError) as bad:
        alice.fine_tuning.content(ft_id=job.id, checkpoint="adapter")
    assert "adapter" in bad.value.message.lower(), bad.value.message

    model, tok = load_causal_lm(tmp_path / "model")
    base, base_tok = load_causal_lm(ft.home.parent / "models" / "qwen3")
    assert isinstance(generate(model, tok, "How many moons does Quelb have?"), str)
    assert answer_loss(model, tok, data.records) < answer_loss(base, base_tok, data.records)

    deleted = alice.fine_tuning.delete(job.id)
    assert deleted is not None
    assert job.id not in {j.id for j in alice.fine_tuning.list().data or []}
    with pytest.raises(together.NotFoundError):
        alice.fine_tuning.retrieve(job.id)
    with pytest.raises(together.NotFoundError):
        alice.fine_tuning.list_events(job.id)
    with pytest.raises(together.NotFoundError):
        alice.fine_tuning.content(ft_id=job.id, checkpoint="model_output_path")
    with pytest.raises(together.NotFoundError):
        alice.fine_tuning.delete(job.id)
    assert not list((ft.blobs / "jobs" / job.id).rglob("*.safetensors")), "the weights of a deleted job are kept"


# --- cancelling ----------------------------------------------------------------------------------------------------


def test_cancel_a_running_job(alice: Together, tmp_path: Path) -> None:
    # Long enough (960 one-example steps) that it is still training when the cancel arrives.
    file_id = upload_ready(alice, tmp_path / "long.jsonl", qa_records(48, nonce=unique()))
    job = create_job(alice, file_id, n_epochs=20, batch_size=1, n_checkpoints=1, suffix="cancel")
    watch = Watch(alice, job.id)
    running = watch.until(
        lambda j: j.status in TERMINAL or (j.status == "running" and (extra(j, "steps_completed") or 0) >= 1),
        timeout=120,
        what="a first training step",
    )
    assert running.status == "running", f"ended {running.status} before it could be cancelled"
    total = extra(running, "total_steps")
    assert total == 20 * 48, running

    with pytest.raises(together.ConflictError):  # a live job cannot be deleted
        alice.fine_tuning.delete(job.id)
    asked = time.monotonic()
    cancelled = alice.fine_tuning.cancel(job.id)
    assert cancelled.id == job.id
    assert cancelled.status in ("cancel_requested", "cancelled"), cancelled.status
    done = watch.finished(timeout=30)
    took = time.monotonic() - asked
    assert done.status == "cancelled", f"{done.status}: {done}"
    assert took < 15, f"the cancel took {took:.1f} s"

    types = event_types(alice, job.id)
    assert_subsequence(types, ("job_start", "training_start", "cancel_requested", "job_stopped"))
    assert "job_complete" not in types and "model_uploading" not in types, types
    # The run saved where it stopped; that checkpoint is kept and can be downloaded.
    steps = intermediate_steps(alice, job.id)
    assert steps and 1 <= steps[-1] < total, steps
    assert not [cp for cp in checkpoints(alice, job.id) if "final" in cp.checkpoint_type.lower()]
    data_at_step = alice.fine_tuning.content(ft_id=job.id, checkpoint_step=steps[-1]).read()
    assert data_at_step[:2] == b"\x1f\x8b"
    with pytest.raises(together.BadRequestError):  # final weights: there are none
        alice.fine_tuning.content(ft_id=job.id, checkpoint="adapter")

    with pytest.raises(together.BadRequestError) as again:
        alice.fine_tuning.cancel(job.id)
    assert "cancelled" in again.value.message, again.value.message
    alice.fine_tuning.delete(job.id)  # a cancelled job is finished: it can go
    with pytest.raises(together.NotFoundError):
        alice.fine_tuning.retrieve(job.id)


# --- other owners, refused requests --------------------------------------------------------------------------------


def test_another_owner_gets_404_on_everything(started: Started, bob: Together, alice: Together, data: Dataset) -> None:
    job_id = started.lora.job_id
    assert job_id not in {j.id for j in bob.fine_tuning.list().data or []}
    calls = {
        "retrieve": lambda: bob.fine_tuning.retrieve(job_id),
        "list_events": lambda: bob.fine_tuning.list_events(job_id),
        "list_checkpoints": lambda: bob.fine_tuning.list_checkpoints(job_id),
        "list_metrics": lambda: bob.fine_tuning.list_metrics(job_id),
        "content": lambda: bob.fine_tuning.content(ft_id=job_id, checkpoint="adapter"),
        "cancel": lambda: bob.fine_tuning.cancel(job_id),
        "delete": lambda: bob.fine_tuning.delete(job_id),
        "limits via the job": lambda: bob.fine_tuning.model_limits(model_name=job_id),
    }
    for name, call in calls.items():
        try:
            call()
        except together.NotFoundError:
            continue
        except together.APIStatusError as exc:
            pytest.fail(f"{name}: {exc.status_code} instead of 404: {exc.message}")
        pytest.fail(f"{name}: bob got an answer about alice's job")
    # Bob cannot train on alice's file, nor continue from her job.
    with pytest.raises(together.NotFoundError) as nf:
        bob.fine_tuning.create(training_file=data.file_id, model=TINY_LLAMA, lora=True)
    assert "training_file" in nf.value.message, nf.value.message
    with pytest.raises(together.NotFoundError):
        bob.fine_tuning.create(training_file=data.file_id, from_checkpoint=job_id)
    # Nothing bob did touched the job.
    assert alice.fine_tuning.retrieve(job_id).status not in ("cancel_requested", "cancelled")


def test_jobs_on_files_that_are_not_ready_are_refused(ft: LiveServer, alice: Together, tmp_path: Path) -> None:
    before = {j.id for j in alice.fine_tuning.list().data or []}

    small = jsonl_bytes(qa_records(3, nonce=unique()))
    with check_held(ft, ft.keys["alice"], small) as checking:
        with pytest.raises(together.BadRequestError) as pending:
            alice.fine_tuning.create(training_file=checking, model=TINY_LLAMA, lora=True)
        assert "training_file" in pending.value.message, pending.value.message
        assert "checked" in pending.value.message, pending.value.message

    with ft.http(ft.keys["alice"]) as http:
        # Bytes never sent, no /preprocess: alice's file exists but is not ready (the estimate says "not validated",
        # the create refuses it naming the parameter).
        opened_only = opened(http, data=jsonl_bytes(qa_records(2, nonce=unique())), file_name="opened.jsonl")
    with pytest.raises(together.BadRequestError) as unfinished:
        alice.fine_tuning.create(training_file=opened_only.file_id, model=TINY_LLAMA, lora=True)
    assert "training_file" in unfinished.value.message and "not ready" in unfinished.value.message

    # A file the server's check rejected (a role it does not know).
    bad = qa_records(3, nonce=unique())
    bad[1]["messages"][0]["role"] = "human"
    path = write_jsonl(tmp_path / "invalid.jsonl", bad)
    f = alice.files.upload(file=path, check=False)
    assert wait_processed_sdk(alice, f.id).processing_status == "INVALID_FORMAT"
    with pytest.raises(together.BadRequestError) as invalid:
        alice.fine_tuning.create(training_file=f.id, model=TINY_LLAMA, lora=True)
    assert "training_file" in invalid.value.message and "invalid" in invalid.value.message.lower()

    with pytest.raises(together.NotFoundError) as missing:
        alice.fine_tuning.create(training_file="file-00000000-0000-4000-8000-000000000000", model=TINY_LLAMA, lora=True)
    assert "training_file" in missing.value.message, missing.value.message

    assert {j.id for j in alice.fine_tuning.list().data or []} == before


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"learning_rate": 0.5}, together.BadRequestError, "learning_rate"),
        # The SDK checks the batch size itself only when LoRA or full is chosen; the server must check it anyway.
        ({"batch_size": 1000, "lora": None}, together.BadRequestError, "batch_size"),
        ({"n_epochs": 1000}, together.BadRequestError, "n_epochs"),
        ({"lora_r": 4096}, together.BadRequestError, "lora_r"),
        ({"suffix": "no spaces allowed"}, together.BadRequestError, "suffix"),
        ({"model": "nobody/no-such-model"}, together.NotFoundError, "model"),
    ],
    ids=["learning_rate", "batch_size", "n_epochs", "lora_r", "suffix", "unknown_model"],
)
def test_bad_parameters_are_refused(
    alice: Together, data: Dataset, kwargs: dict[str, Any], error: type[Exception], param: str
) -> None:
    before = {j.id for j in alice.fine_tuning.list().data or []}
    params: dict[str, Any] = {"model": TINY_LLAMA, "lora": True, **kwargs}
    with pytest.raises(error) as exc:
        alice.fine_tuning.create(training_file=data.file_id, **params)
    assert exc.value.status_code in (400, 404)  # type: ignore[attr-defined]
    message = exc.value.message  # type: ignore[attr-defined]
    assert param in message, message
    assert {j.id for j in alice.fine_tuning.list().data or []} == before
