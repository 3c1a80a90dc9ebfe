"""Preference tuning end to end through the real `together` SDK (2.x) against a live server training a tiny model:
an SFT job, then DPO, SimPO and RPO jobs that start from it (`from_checkpoint` = the SFT job). Each one's reward
accuracy on its training pairs reaches 0.9 and the chosen answers' log-probability margin grows; its first step's
rewards are 0 where it has a reference (the reference is the SFT model it starts from). Preference data is refused
for SFT and SFT data for DPO at create, with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import together
from e2e_support import LiveServer
from ft_support import (
    COMPLETED_LIFECYCLE,
    FACTS,
    TINY_LLAMA,
    Watch,
    assert_subsequence,
    client,
    create_job,
    event_types,
    events,
    ft_server,
    metrics,
    qa_records,
    skip_without_training,
    upload_ready,
)
from together import Together

pytestmark = pytest.mark.timeout(300)


def preference_records() -> list[dict[str, Any]]:
    """Each fact's question with its answer preferred to another fact's answer."""
    n = 8
    return [
        {
            "input": {"messages": [{"role": "user", "content": FACTS[i % len(FACTS)][0]}]},
            "preferred_output": [{"role": "assistant", "content": FACTS[i % len(FACTS)][1]}],
            "non_preferred_output": [{"role": "assistant", "content": FACTS[(i + 3) % len(FACTS)][1]}],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    skip_without_training()
    with ft_server(tmp_path_factory.mktemp("dpo"), owners=("alice",), slots=3) as server:
        yield server


@pytest.fixture(scope="module")
def alice(srv: LiveServer) -> Together:
    return client(srv, srv.keys["alice"])


@pytest.fixture(scope="module")
def files(alice: Together, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {
        "sft": upload_ready(alice, Path(folder / "sft.jsonl"), qa_records(8)),
        "pairs": upload_ready(alice, Path(folder / "pairs.jsonl"), preference_records()),
    }


@pytest.fixture(scope="module")
def sft_job(alice: Together, files: dict[str, str]) -> str:
    job = create_job(alice, files["sft"], n_epochs=3, batch_size=8, n_checkpoints=1)
    Watch(alice, job.id).completed(timeout=240)
    return str(job.id)


VARIANTS = {
    "dpo": {"dpo_beta": 0.5},
    "simpo": {"dpo_beta": 0.5, "simpo_gamma": 0.5},
    "rpo": {"dpo_beta": 0.5, "rpo_alpha": 1.0},
}


@pytest.fixture(scope="module")
def dpo_jobs(alice: Together, files: dict[str, str], sft_job: str) -> dict[str, str]:
    """The three preference jobs from the SFT job, created back to back (they train side by side)."""
    jobs = {}
    for name, knobs in VARIANTS.items():
        job = alice.fine_tuning.create(
            training_file=files["pairs"], from_checkpoint=sft_job, training_method="dpo",
            lora=True, n_epochs=20, batch_size=8, learning_rate=1e-2, n_checkpoints=1,
            suffix=name, **knobs,
        )  # fmt: skip
        assert job.status in ("pending", "queued"), job.status
        jobs[name] = str(job.id)
    return jobs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_preference_jobs_from_an_sft_job_learn_the_preference(alice: Together, dpo_jobs: dict[str, str], name: str):
    job_id = dpo_jobs[name]
    job = Watch(alice, job_id).completed(timeout=280)
    assert job.training_method is not None and job.training_method.method == "dpo", job.training_method
    assert_subsequence(event_types(alice, job_id), COMPLETED_LIFECYCLE)
    rows = [m for m in metrics(alice, job_id) if "train/rewards/accuracies" in m]
    assert len(rows) == 20, rows[:2]
    accuracy = [m["train/rewards/accuracies"] for m in rows]
    margins = [m["train/rewards/margins"] for m in rows]
    assert accuracy[-1] >= 0.9, accuracy
    assert sum(margins[-3:]) > sum(margins[:3]) + 0.5, margins  # SimPO's are per token: smaller
    start = next(e for e in events(alice, job_id) if e.type == "training_start").message
    if name == "simpo":
        assert "SimPO" in start and "reference-free" in start, start
    else:  # the reference is the SFT model the job starts from: the first step's rewards are 0
        assert abs(rows[0]["train/rewards/chosen"]) < 1e-3 and abs(rows[0]["train/rewards/rejected"]) < 1e-3, rows[0]
        assert (
            "continuing from" in next(e for e in events(alice, job_id) if e.type == "model_download_complete").message
        )
    if name == "rpo":
        assert all(m["train/loss"] > m["train/dpo_loss"] for m in rows)


def test_data_that_does_not_suit_the_method_is_refused_at_create(alice: Together, files: dict[str, str]):
    with pytest.raises(together.BadRequestError) as refused:
        alice.fine_tuning.create(training_file=files["sft"], model=TINY_LLAMA, training_method="dpo", lora=True)
    assert "DPO needs preference data" in str(refused.value)
    with pytest.raises(together.BadRequestError) as refused:
        alice.fine_tuning.create(training_file=files["pairs"], model=TINY_LLAMA, lora=True)
    assert "preference data is for training_method dpo" in str(refused.value)
