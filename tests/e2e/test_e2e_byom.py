"""Bring your own model, and pushing results to the hub, end to end: `from_hf_model` names a repo outside the
catalog on the loopback hub stand-in (tests/hub_standin.py, through HF_ENDPOINT), `model` the catalog template whose
limits apply, created and watched through the real `together` SDK.

A public repo trains, at its default revision and at another one; a private repo trains with the job's token. What
cannot work is refused at create, naming from_hf_model and the reason, before any job exists: a private repo without
a token (the server's own token, which could read it, is never used for a repo the user chose), a model that is not a
causal LM, one of more than 100B parameters (by its files' sizes), and a model without a chat template for
conversational data.

`hf_output_repo_name` pushes the final adapter, its config and a model card to the stand-in with the job's token; a
push the hub refuses (a read-only token) leaves a completed job with a warning event.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
import together
from e2e_support import LiveServer, unique
from ft_support import (
    TINY_LLAMA,
    Watch,
    client,
    create_job,
    events,
    ft_server,
    qa_records,
    save_tiny,
    skip_without_training,
    upload_ready,
)
from hub_standin import HubStandin
from together import Together

pytestmark = pytest.mark.timeout(300)

PUBLIC, PRIVATE = "byom-org/public-llama", "byom-org/private-llama"
ENCODER, HUGE, PLAIN = "byom-org/an-encoder", "byom-org/huge-llama", "byom-org/no-chat-template"
TOKEN, SERVER_TOKEN = f"hf_byom_{unique()}", f"hf_server_{unique()}"
WRITER, READER = f"hf_writer_{unique()}", f"hf_reader_{unique()}"
SMALL = {"n_epochs": 1, "batch_size": 4, "n_checkpoints": 1}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubStandin]:
    skip_without_training()
    root = tmp_path_factory.mktemp("byom-models")
    tiny = save_tiny(root / "llama", "llama")
    standin = HubStandin()
    standin.add_repo(PUBLIC, tiny)
    v2 = shutil.copytree(tiny, root / "llama-v2")
    (v2 / "README.md").write_text("revision two\n")
    standin.add_repo(PUBLIC, v2, revision="v2")
    standin.add_repo(PRIVATE, tiny, private=True, token=TOKEN)
    standin.add_repo(PRIVATE, tiny, private=True, token=SERVER_TOKEN)  # the server's own token could read it
    encoder = shutil.copytree(tiny, root / "encoder")
    config = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps(config | {"architectures": ["BertModel"], "model_type": "bert"}))
    standin.add_repo(ENCODER, encoder)
    standin.add_repo(HUGE, tiny, listed_sizes={"model.safetensors": 500 * 10**9})  # fp32: ~125B parameters
    plain = shutil.copytree(tiny, root / "plain")
    tok = json.loads((plain / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tok))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    standin.add_repo(PLAIN, plain)
    standin.issue_token(WRITER, write=True)
    standin.issue_token(READER)
    with standin:
        yield standin


@pytest.fixture(scope="module")
def srv(hub: HubStandin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("byom")
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(root / "hf-home"),  # no developer login, no token file
        "HF_TOKEN": SERVER_TOKEN,  # the operator's own token: for the catalog's models only
        "HUGGING_FACE_HUB_TOKEN": "",
    }
    with ft_server(root, owners=("alice",), slots=3, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def alice(srv: LiveServer) -> Together:
    return client(srv, srv.keys["alice"])


@pytest.fixture(scope="module")
def data(alice: Together, tmp_path_factory: pytest.TempPathFactory) -> str:
    return upload_ready(alice, tmp_path_factory.mktemp("byom-data") / "facts.jsonl", qa_records(8))


@pytest.fixture(scope="module")
def jobs(alice: Together, data: str) -> dict[str, str]:
    """The three jobs that train, created back to back."""
    made = {
        "public": create_job(alice, data, from_hf_model=PUBLIC, suffix="public", **SMALL),
        "v2": create_job(alice, data, from_hf_model=PUBLIC, hf_model_revision="v2", suffix="v2", **SMALL),
        "private": create_job(alice, data, from_hf_model=PRIVATE, hf_api_token=TOKEN, suffix="private", **SMALL),
        "push": create_job(
            alice, data, hf_output_repo_name="me-org/pushed", hf_api_token=WRITER, suffix="push", **SMALL
        ),
        "refused": create_job(
            alice, data, hf_output_repo_name="me-org/refused", hf_api_token=READER, suffix="refused", **SMALL
        ),
    }
    return {name: str(job.id) for name, job in made.items()}


def test_a_public_repo_trains_with_the_templates_limits(alice: Together, jobs: dict[str, str], hub: HubStandin):
    job = Watch(alice, jobs["public"]).completed(timeout=240)
    assert job.model == TINY_LLAMA and job.from_hf_model == PUBLIC, job
    assert {"config.json", "model.safetensors"} <= set(hub.file_downloads(PUBLIC))
    ready = next(e for e in events(alice, job.id) if e.type == "model_download_complete").message
    assert PUBLIC in ready, ready


def test_a_revision_reaches_the_download(alice: Together, jobs: dict[str, str], hub: HubStandin):
    Watch(alice, jobs["v2"]).completed(timeout=240)
    v2 = hub.repos[PUBLIC].branches["v2"].sha
    fetched = [r.path for r in hub.requests if r.path.startswith(f"/{PUBLIC}/resolve/")]
    assert any(f"/resolve/{v2}/" in p or "/resolve/v2/" in p for p in fetched), fetched
    main = hub.repos[PUBLIC].branches["main"].sha
    assert v2 != main and any(r.path == f"/api/models/{PUBLIC}/revision/v2" for r in hub.requests)


def test_a_private_repo_trains_with_the_jobs_token_only(alice: Together, jobs: dict[str, str], hub: HubStandin):
    Watch(alice, jobs["private"]).completed(timeout=240)
    asked = [r for r in hub.requests if r.path.startswith((f"/api/models/{PRIVATE}", f"/{PRIVATE}/"))]
    assert asked and {r.authorization for r in asked} == {f"Bearer {TOKEN}"}, {r.authorization for r in asked}
    assert all(r.authorization is None for r in hub.requests if r.listener == "cdn")


def _refused(c: Together, data: str, **kwargs: object) -> str:
    before = len(c.fine_tuning.list().data or [])
    with pytest.raises(together.APIStatusError) as refused:
        c.fine_tuning.create(training_file=data, model=TINY_LLAMA, lora=True, **kwargs)
    body = refused.value.body["error"]  # type: ignore[attr-defined]
    assert body["param"] == "from_hf_model", body
    assert len(c.fine_tuning.list().data or []) == before  # nothing was queued
    return str(body["message"])


def test_what_cannot_work_is_refused_at_create_with_its_reason(alice: Together, data: str, hub: HubStandin):
    message = _refused(alice, data, from_hf_model=PRIVATE)
    assert f"'{PRIVATE}' was not found" in message and "as hf_api_token" in message, message
    assert not any(r.authorization == f"Bearer {SERVER_TOKEN}" for r in hub.requests)  # never the server's token
    message = _refused(alice, data, from_hf_model=ENCODER)
    assert "not a causal language model" in message and "BertModel" in message, message
    message = _refused(alice, data, from_hf_model=HUGE)
    assert "about 125B parameters" in message and "up to 100B" in message, message
    message = _refused(alice, data, from_hf_model=PLAIN)
    assert "no chat template" in message, message
    message = _refused(alice, data, from_hf_model=PUBLIC, hf_model_revision="no-such-branch")
    assert "revision 'no-such-branch'" in message, message
    message = _refused(alice, data, from_hf_model="not a repo id")
    assert "Hugging Face repo id" in message, message


def test_the_final_adapter_and_a_model_card_are_pushed_with_the_jobs_token(
    alice: Together, jobs: dict[str, str], hub: HubStandin
):
    job = Watch(alice, jobs["push"]).completed(timeout=240)
    files = hub.repos["me-org/pushed"].branches["main"].files
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(files), sorted(files)
    card = files["README.md"].data.decode()
    assert "base_model: tiny/llama" in card and "library_name: peft" in card, card
    assert "- examples: 8" in card and "final training loss:" in card and "| learning_rate |" in card, card
    writes = [r for r in hub.requests if r.method == "POST" and "me-org/pushed" in r.path]  # preupload, commit
    assert len(writes) >= 2 and {r.authorization for r in writes} == {f"Bearer {WRITER}"}, writes
    pushed = [e for e in events(alice, job.id) if e.type == "model_upload_complete" and "pushed" in e.message]
    assert pushed and "me-org/pushed" in pushed[0].message, [e.message for e in events(alice, job.id)]


def test_a_refused_push_leaves_a_completed_job_with_a_warning(alice: Together, jobs: dict[str, str]):
    job = Watch(alice, jobs["refused"]).completed(timeout=240)
    warnings = [e.message for e in events(alice, job.id) if e.type == "warning"]
    assert any("could not be pushed" in m and "me-org/refused" in m for m in warnings), warnings
    assert all(READER not in m for m in warnings)


def test_a_push_needs_the_jobs_own_token(alice: Together, data: str):
    with pytest.raises(together.BadRequestError) as refused:
        alice.fine_tuning.create(training_file=data, model=TINY_LLAMA, lora=True, hf_output_repo_name="me-org/x")
    assert "needs hf_api_token" in str(refused.value)
