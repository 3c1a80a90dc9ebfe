"""Weights & Biases logging end to end: a job created through the real `together` SDK with `wandb_api_key` and the
other `wandb_*` parameters, trained by a live server, logs its metrics to W&B.

W&B here is a loopback stand-in (tests/wandb_standin.py, started by the test: the job's `wandb_base_url`
points at it) that records what the real wandb client sends it. It must receive the job's key, and a run whose
history is the job's metrics (as `list_metrics` answers them) and whose config holds the job's hyperparameters; the job
reports the run's page as `wandb_url`. The key is echoed by no API answer and written in no file of the server's home
(logs, events, specs, wandb's run folder), the database that keeps the job's secrets aside.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pg_support
import pytest
from ft_support import (
    TINY_LLAMA,
    Watch,
    client,
    create_job,
    events,
    ft_server,
    metrics,
    qa_records,
    skip_without_training,
    train_rows,
    upload_ready,
)
from wandb_standin import WandbStub

pytestmark = pytest.mark.timeout(240)

N_EXAMPLES, EPOCHS, BATCH = 8, 2, 4
STEPS = EPOCHS * N_EXAMPLES // BATCH  # batch_size counts examples per step, packed or not


def _allowing(*stubs: WandbStub) -> dict[str, str]:
    """The server setting that lets jobs name these W&B servers (any other wandb_base_url is refused at create)."""
    return {"TUNEFORGE_WANDB_BASE_URLS": json.dumps([stub.base_url for stub in stubs])}


def test_a_job_with_a_wandb_key_logs_its_metrics_to_wandb(tmp_path: Path) -> None:
    skip_without_training()
    key = "tfwb" + uuid.uuid4().hex + uuid.uuid4().hex[:8]  # wandb wants 40+ characters
    wandb_home = tmp_path / "wandb-home"
    # The server's environment, which its runs inherit: online W&B (whatever the developer's own settings), and
    # wandb's config and cache folders where this test can search them.
    env = {"WANDB_MODE": "online", "WANDB_CONFIG_DIR": str(wandb_home / "config"),
           "WANDB_CACHE_DIR": str(wandb_home / "cache"), "WANDB_DATA_DIR": str(wandb_home / "data")}  # fmt: skip
    with WandbStub() as stub, ft_server(tmp_path, owners=("alice",), env=env | _allowing(stub)) as server:
        alice = client(server, server.keys["alice"])
        file_id = upload_ready(alice, tmp_path / "facts.jsonl", qa_records(N_EXAMPLES))
        job = create_job(alice, file_id, n_epochs=EPOCHS, batch_size=BATCH, n_checkpoints=1, wandb_api_key=key,
                         wandb_base_url=stub.base_url, wandb_project_name="tf-e2e", wandb_name="e2e run",
                         wandb_entity="team")  # fmt: skip
        done = Watch(alice, job.id).completed(timeout=180)

        # W&B got the key, and a run named after the job in the project, entity and name asked for.
        assert stub.api_keys == {key}
        run = stub.run()
        assert (run.run_id, run.project, run.entity, run.display_name) == (job.id, "tf-e2e", "team", "e2e run")
        assert run.complete and run.exitcode == 0
        assert done.wandb_url == stub.run_url(run)
        assert (done.wandb_project_name, done.wandb_name, done.wandb_entity, done.wandb_base_url) == (
            "tf-e2e", "e2e run", "team", stub.base_url
        )  # fmt: skip
        [init] = [e for e in events(alice, job.id) if e.type == "wandb_init"]
        assert init.wandb_url == done.wandb_url

        # The run's history is the job's metrics, step by step.
        logged = {row["_step"]: row for row in run.history}
        rows = train_rows(metrics(alice, job.id))
        assert [int(r["train/global_step"]) for r in rows] == list(range(1, STEPS + 1))
        for r in rows:
            step = int(r["train/global_step"])
            assert logged[step]["train/loss"] == r["train/loss"], (step, logged[step], r)
            assert logged[step]["train/lr"] == r["train/lr"], (step, logged[step], r)
        assert run.config["learning_rate"] == done.learning_rate
        assert (run.config["n_epochs"], run.config["batch_size"], run.config["total_steps"]) == (EPOCHS, BATCH, STEPS)
        assert run.config["base_model"] == done.model

        # The key is in no answer of the API, in no request body W&B got, and in no file of the server's home, the
        # database, its WAL and the logs included (a job's secrets are stored sealed, and cleared when it ends).
        with server.http(server.keys["alice"]) as http:
            answers = [http.get(f"/v1/fine-tunes/{job.id}{path}").text for path in ("", "/events", "/metrics")]
            answers.append(http.get("/v1/fine-tunes").text)
        assert all(a and key not in a for a in answers)
        assert not [b for b in stub.bodies if key.encode() in b]
        assert key not in server.log()
        if pg_support.enabled():  # the database is a server's: every row of every table, as text
            assert key not in pg_support.dump(server.home)
        else:
            assert list(server.home.glob("tuneforge.db*"))  # the SQLite file is in the home, which is searched
        leaks = [str(p) for root in (server.home, wandb_home) for p in root.rglob("*")
                 if p.is_file() and key.encode() in p.read_bytes()]  # fmt: skip
        assert not leaks, f"the W&B key is written in {leaks}"
        assert list((server.home / "work" / job.id / "wandb").glob(f"run-*-{job.id}/run-{job.id}.wandb"))


@pytest.mark.parametrize("server_key_allowed", [False, True])
def test_the_operators_wandb_key_never_goes_where_a_job_points(tmp_path: Path, server_key_allowed: bool) -> None:
    """The server holds a W&B key of its own. A job naming a W&B server the operator did not allow is refused at
    create; one naming an allowed server but bringing no key of its own trains without W&B (one warning), and that
    server never sees the operator's key, even where the operator lets keyless jobs use it (that key only ever
    goes to the server's own W&B, and a job that names another gets none)."""
    skip_without_training()
    operator_key = "tfoperator" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    with WandbStub() as allowed, WandbStub() as elsewhere:
        env = {"WANDB_MODE": "online", "WANDB_API_KEY": operator_key, **_allowing(allowed),
               "TUNEFORGE_WANDB_SERVER_KEY": "true" if server_key_allowed else "false"}  # fmt: skip
        with ft_server(tmp_path, owners=("alice",), env=env) as server:
            alice = client(server, server.keys["alice"])
            file_id = upload_ready(alice, tmp_path / "facts.jsonl", qa_records(4))
            with server.http(server.keys["alice"]) as http:
                body = {"training_file": file_id, "model": TINY_LLAMA, "wandb_base_url": elsewhere.base_url,
                        "wandb_project_name": "p"}  # fmt: skip
                r = http.post("/v1/fine-tunes", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "wandb_base_url", r.text
            assert allowed.base_url in r.json()["error"]["message"]

            job = create_job(alice, file_id, n_epochs=1, batch_size=4, n_checkpoints=1,
                             wandb_base_url=allowed.base_url, wandb_project_name="p")  # fmt: skip
            done = Watch(alice, job.id).completed(timeout=180)
            warnings = [e.message for e in events(alice, job.id) if e.type == "warning"]
            assert any("no W&B key" in m for m in warnings), warnings
            assert done.wandb_url is None
        assert operator_key not in allowed.api_keys | elsewhere.api_keys
        assert allowed.requests == [] and elsewhere.requests == []  # nothing was sent anywhere
