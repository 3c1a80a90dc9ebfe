"""The hosted service's model names through the API: `/v1/models` lists them, saying which are downloaded; a job on
one names it as on the hosted service; a model too large for this host is refused at create with the memory it
needs and has."""

from __future__ import annotations

from tuneforge.catalog.entries import SMOLLM2
from tuneforge.catalog.hosted import HOSTED
from tuneforge.catalog.inspect import host_memory_bytes, training_bytes
from tuneforge.catalog.source import safe_name
from tuneforge.jobs.stored_plan import plan_of
from tuneforge.store import jobs as repo

BIG = "meta-llama/Meta-Llama-3.1-70B-Instruct-Reference"
SMALL = "Qwen/Qwen2.5-0.5B-Instruct"


def test_models_lists_the_hosted_names_and_which_are_downloaded(ft_hosted) -> None:
    folder = ft_hosted.settings.home / "models" / safe_name(SMOLLM2.name)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a finished conversion
    listed = {m["id"]: m for m in ft_hosted.client.get("/v1/models", headers=ft_hosted.alice).json()}
    assert {e.name for e in HOSTED} | {SMOLLM2.name} <= set(listed)
    assert listed[SMOLLM2.name]["downloaded"] is True
    assert all(listed[e.name]["downloaded"] is False for e in HOSTED)  # they download on first use
    assert listed[BIG]["parameter_count"] > 7e10 and listed[BIG]["context_length"] == 131072
    assert listed["google/gemma-3-4b-it"]["supports_vision"] is True


def test_a_hosted_name_makes_a_job_on_its_hub_repo_and_one_too_large_is_refused(ft_hosted) -> None:
    train = ft_hosted.upload(ft_hosted.conversations)
    job = ft_hosted.create(ft_hosted.sdk_body(train, model=SMALL))
    source = plan_of(_row(ft_hosted, job["id"])).model_source
    assert (job["model"], source.source_kind, source.source) == (SMALL, "hub", "Qwen/Qwen2.5-0.5B-Instruct")
    host = host_memory_bytes()
    assert training_bytes(70_600_000_000, "lora") > host  # what this test relies on: no machine here holds 282 GB
    with ft_hosted.app.state.db.session() as s:
        before = len(repo.list_jobs(s, owner="alice"))
    r = ft_hosted.client.post("/v1/fine-tunes", json=ft_hosted.sdk_body(train, model=BIG), headers=ft_hosted.alice)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and "needs at least 263.0 GiB of memory to train (lora" in error["message"]
    assert f"this host has {host / 2**30:.1f} GiB" in error["message"]
    with ft_hosted.app.state.db.session() as s:
        assert len(repo.list_jobs(s, owner="alice")) == before


def _row(ft, job_id):
    with ft.app.state.db.session() as s:
        return repo.get_job(s, job_id=job_id)
