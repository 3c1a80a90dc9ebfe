"""Catalog models whose weights live on a Hugging Face hub, end to end: a live `tuneforge serve` whose training runs
download from the loopback hub stand-in (tests/hub_standin.py, reached through HF_ENDPOINT), models registered with the
real `tuneforge models add --source hub:ORG/NAME`, jobs created and watched through the real `together` SDK.

A private repo trains with the job's `hf_api_token`, which reaches the hub and nowhere else: not the API's answers, the
server log, the run's files or its events. A catalog entry whose repo is gone from the hub is accepted at create time
(the catalog defines the valid names) and the job ends `error` with a reason that names the repo.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from e2e_support import LiveServer, start_server, tuneforge_cli, unique
from ft_support import (
    TRAIN_ENV,
    Watch,
    client,
    create_job,
    events,
    finish_ft_server,
    qa_records,
    save_tiny,
    skip_without_training,
    upload_ready,
)
from hub_standin import HubStandin
from together import Together

pytestmark = pytest.mark.timeout(300)

PRIVATE_REPO, GONE_REPO = "hub-org/private-llama", "hub-org/deleted-model"
PRIVATE_MODEL, GONE_MODEL = "hub/private-llama", "hub/gone"
TOKEN = f"hf_e2e_{unique()}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubStandin]:
    skip_without_training()
    standin = HubStandin()
    standin.add_repo(PRIVATE_REPO, save_tiny(tmp_path_factory.mktemp("hub-models") / "llama", "llama"),
                     private=True, token=TOKEN)  # fmt: skip
    with standin:
        yield standin


@pytest.fixture(scope="module")
def hub_server(hub: HubStandin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server (two training slots) whose runs reach the stand-in; the hub models added with the real CLI."""
    root = tmp_path_factory.mktemp("hub-e2e")
    env = {
        **TRAIN_ENV,
        "TUNEFORGE_TRAIN_SLOTS": "2",
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",  # other test folders set it in this process, whose environment servers inherit
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(root / "hf-home"),  # no developer login, no token file
        "HF_TOKEN": "",
        "HUGGING_FACE_HUB_TOKEN": "",
    }
    srv = start_server(root / "home", root / "server.log", env=env)
    try:
        for name, repo in ((PRIVATE_MODEL, PRIVATE_REPO), (GONE_MODEL, GONE_REPO)):
            out = tuneforge_cli("models", "add", name, "--source", f"hub:{repo}", home=srv.home, env=srv.env)
            assert f"added {name} (hub:{repo})" in out, out
        listed = tuneforge_cli("models", "list", home=srv.home, env=srv.env)
        assert f"hub:{PRIVATE_REPO}" in listed and f"hub:{GONE_REPO}" in listed, listed
        srv.create_keys(["alice"])
        yield srv
    finally:
        finish_ft_server(srv)


@pytest.fixture(scope="module")
def owner(hub_server: LiveServer) -> Together:
    return client(hub_server, hub_server.keys["alice"])


@dataclass
class Jobs:
    private: Watch  # the private repo, with the token
    gone: Watch  # a catalog entry whose repo is not on the hub
    no_token: Watch  # the private repo, without a token


@pytest.fixture(scope="module")
def jobs(owner: Together, tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    """Three jobs created back to back; the two that fail do so while downloading, next to the one that trains."""
    file_id = upload_ready(owner, tmp_path_factory.mktemp("hub-data") / "facts.jsonl", qa_records(8))
    small = {"n_epochs": 1, "batch_size": 4, "n_checkpoints": 1}
    private = create_job(owner, file_id, model=PRIVATE_MODEL, hf_api_token=TOKEN, suffix="hub", **small)
    gone = create_job(owner, file_id, model=GONE_MODEL, suffix="gone", **small)
    no_token = create_job(owner, file_id, model=PRIVATE_MODEL, suffix="notoken", **small)
    return Jobs(Watch(owner, private.id), Watch(owner, gone.id), Watch(owner, no_token.id))


def job_error(c: Together, job_id: str) -> str:
    [message] = [str(e.message) for e in events(c, job_id) if str(e.type) == "job_error"]
    return message


def test_a_job_on_a_private_hub_model_trains_with_its_token(jobs: Jobs, hub: HubStandin) -> None:
    job = jobs.private.completed(timeout=240)
    assert job.model == PRIVATE_MODEL
    fetched = [r for r in hub.requests if r.path.startswith((f"/api/models/{PRIVATE_REPO}", f"/{PRIVATE_REPO}/"))]
    with_token = [r for r in fetched if r.authorization == f"Bearer {TOKEN}"]
    assert with_token and all(r.status in (200, 302) for r in with_token), with_token
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(hub.file_downloads(PRIVATE_REPO))
    assert all(r.authorization is None for r in hub.requests if r.listener == "cdn")  # the token stays on the hub


def test_the_token_appears_in_no_answer_log_or_file(jobs: Jobs, hub_server: LiveServer, owner: Together) -> None:
    for watch in (jobs.private, jobs.no_token, jobs.gone):
        watch.finished(timeout=240)
    answers = []
    with hub_server.http(hub_server.keys["alice"]) as http:
        for path in (
            "/v1/fine-tunes",
            f"/v1/fine-tunes/{jobs.private.job_id}",
            f"/v1/fine-tunes/{jobs.private.job_id}/events",
            f"/v1/fine-tunes/{jobs.private.job_id}/checkpoints",
            f"/v1/fine-tunes/{jobs.private.job_id}/metrics",
            f"/v1/models/{PRIVATE_MODEL}",
        ):
            r = http.get(path)
            answers.append(f"{path} {r.status_code} {r.text}")
    answers.append(owner.fine_tuning.retrieve(jobs.private.job_id).model_dump_json())
    answers.append(owner.fine_tuning.list().model_dump_json())
    answers.append("\n".join(str(e.message) for e in events(owner, jobs.private.job_id)))
    for answer in answers:
        assert TOKEN not in answer, answer[:300]
    assert TOKEN not in hub_server.log()
    # Every file of the home but the database (which keeps the job's secrets to start its runs): specs, event
    # streams, run logs, checkpoints, weights, the catalog.
    files = [p for p in hub_server.home.rglob("*") if p.is_file() and not p.name.startswith("tuneforge.db")]
    assert any(p.name.startswith("events-") for p in files) and any(p.name.startswith("train-") for p in files)
    leaked = [str(p) for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_a_catalog_entry_whose_repo_is_gone_fails_with_the_reason(jobs: Jobs, owner: Together) -> None:
    job = jobs.gone.finished(timeout=240)
    assert job.status == "error", jobs.gone.statuses
    message = job_error(owner, jobs.gone.job_id)
    assert f"base model '{GONE_MODEL}': the Hugging Face repo '{GONE_REPO}' was not found on the hub at" in message
    assert "\n" not in message, message


def test_a_private_repo_without_a_token_fails_and_says_what_to_pass(jobs: Jobs, owner: Together) -> None:
    job = jobs.no_token.finished(timeout=240)
    assert job.status == "error", jobs.no_token.statuses
    message = job_error(owner, jobs.no_token.job_id)
    assert f"'{PRIVATE_REPO}' was not found" in message and "as hf_api_token" in message, message


def test_a_model_outside_the_catalog_is_refused_at_create(owner: Together, jobs: Jobs) -> None:
    import together

    with pytest.raises(together.NotFoundError) as caught:
        owner.fine_tuning.create(training_file=_file_of(owner, jobs), model="hub-org/not-in-the-catalog", lora=True)
    # The SDK asks for the model's limits before it posts the job: either answer is a 404 that names the model.
    assert "'hub-org/not-in-the-catalog'" in str(caught.value) and "catalog" in str(caught.value), caught.value


def _file_of(c: Together, jobs: Jobs) -> str:
    return str(c.fine_tuning.retrieve(jobs.private.job_id).training_file)
