"""The DPO recipe (`train/recipes/dpo.py`) on a tiny model: its losses are TRL's formulas; DPO, SimPO and RPO
learn a preference (reward accuracy on the training pairs >= 0.9, margins growing), LoRA and full; the reference
is the starting weights (an SFT job's, with from_checkpoint), kept across a resume; bad data stops before
training with the line and the reason."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from recipe_support import QA, conversations, make_job, run_in_process
from safetensors.torch import load_file

from tuneforge.storage.layout import checkpoint_prefix, final_prefix
from tuneforge.train.recipes.dpo import PairBatch, preference_loss
from tuneforge.train.spec import Hyper, InitWeights, Resume

# Each question with its right answer preferred to another question's answer.
PAIRS = [
    {
        "input": {"messages": [{"role": "user", "content": q}]},
        "preferred_output": [{"role": "assistant", "content": a}],
        "non_preferred_output": [{"role": "assistant", "content": QA[(i + 3) % len(QA)][1]}],
    }
    for i, (q, a) in enumerate(QA)
]
LEARN = {"learning_rate": 5e-3, "batch_size": 8, "n_epochs": 30, "lora_r": 16, "lora_alpha": 32}


def _pairs(chosen, rejected, n_chosen, n_rejected) -> PairBatch:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairBatch(t(chosen), t(rejected), t(n_chosen), t(n_rejected))


def test_preference_losses_are_trls_formulas():
    policy = _pairs([-3.0, -8.0], [-5.0, -4.0], [2, 4], [5, 2])
    ref = torch.tensor([[-4.0, -4.5], [-6.0, -6.0]], dtype=torch.float64)
    # DPO: -log sigmoid(beta * ((pc - rc) - (pr - rr)))
    losses, chosen, rejected = preference_loss(policy, ref, Hyper(dpo_beta=0.5))
    delta = [(-3 + 4) - (-5 + 4.5), (-8 + 6) - (-4 + 6)]
    assert losses.tolist() == pytest.approx([-math.log(1 / (1 + math.exp(-0.5 * d))) for d in delta])
    assert chosen.tolist() == pytest.approx([0.5, -1.0]) and rejected.tolist() == pytest.approx([-0.25, 1.0])
    # sigmoid_norm: each log-ratio divided by its completion's length
    losses, _, _ = preference_loss(policy, ref, Hyper(dpo_beta=0.5, dpo_normalize_logratios_by_length=True))
    norm = [(1 / 2) - (-0.5 / 5), (-2 / 4) - (2 / 2)]
    assert losses.tolist() == pytest.approx([float(-F.logsigmoid(torch.tensor(0.5 * d))) for d in norm])
    # SimPO: no reference, length-normalised, margin gamma
    simpo = Hyper(dpo_beta=2.0, simpo_gamma=0.5, dpo_reference_free=True, dpo_normalize_logratios_by_length=True)
    losses, chosen, _ = preference_loss(policy, ref, simpo)
    avg = [(-3 / 2) - (-5 / 5), (-8 / 4) - (-4 / 2)]
    assert losses.tolist() == pytest.approx([float(-F.logsigmoid(torch.tensor(2.0 * d - 0.5))) for d in avg])
    assert chosen.tolist() == pytest.approx([2.0 * -1.5, 2.0 * -2.0])


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_model):
    """An SFT LoRA run on the conversations, the starting point of the DPO runs."""
    hyper = {"learning_rate": 5e-3, "batch_size": 8, "n_epochs": 40, "lora_r": 16, "lora_alpha": 32}
    job = make_job(tmp_path_factory.mktemp("dpo"), tiny_model, job_id="ft-sft", hyper=hyper)
    assert run_in_process(job) == 0, job.result()
    return job


def _learned(job) -> None:
    assert job.result()["status"] == "completed", job.result()
    accuracy = job.metric("train/rewards/accuracies")
    margins = job.metric("train/rewards/margins")
    assert accuracy[-1] >= 0.9
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.5  # the chosen answers pull away
    chosen, rejected = job.metric("train/logps/chosen"), job.metric("train/logps/rejected")
    assert chosen[-1] - rejected[-1] > chosen[0] - rejected[0]


@pytest.mark.parametrize(
    "variant", [{}, {"simpo_gamma": 0.5, "dpo_reference_free": True, "dpo_normalize_logratios_by_length": True},
                {"rpo_alpha": 1.0}], ids=["dpo", "simpo", "rpo"],
)  # fmt: skip
def test_dpo_from_an_sft_checkpoint_learns_the_preference(sft, tiny_model, variant):
    init = InitWeights(key=final_prefix("ft-sft", "adapter"), adapter=True, step=40)
    name = f"ft-dpo-{'-'.join(variant) or 'plain'}"
    job = make_job(sft.root, tiny_model, job_id=name, hyper=LEARN | {"dpo_beta": 0.5} | variant, rows=PAIRS,
                   init=init, method="dpo")  # fmt: skip
    assert run_in_process(job) == 0, job.result()
    _learned(job)
    start = next(e for e in job.events() if e["type"] == "training_start")["message"]
    if variant.get("simpo_gamma"):
        assert "SimPO" in start and "reference-free" in start
    else:
        # The reference is the SFT model: before the first update the policy is that model, so every reward is 0
        # (a reference of the base with the adapter disabled would give the SFT adapter's effect instead).
        assert "reference log-probabilities of 8 pairs" in start
        assert job.metric("train/rewards/chosen")[0] == pytest.approx(0.0, abs=1e-4)
        assert job.metric("train/rewards/rejected")[0] == pytest.approx(0.0, abs=1e-4)
    if variant.get("rpo_alpha"):  # the NLL of the chosen answers is part of the loss
        assert all(t > d for t, d in zip(job.metric("train/loss"), job.metric("train/dpo_loss"), strict=True))
    else:
        assert job.metric("train/loss") == job.metric("train/dpo_loss")
    adapter = job.local(final_prefix(name, "adapter"))
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["method"] == "dpo" and manifest["kind"] == "adapter"


def test_full_dpo_learns_the_preference(tmp_path, tiny_model):
    hyper = {"training_type": "full", "learning_rate": 1e-3, "batch_size": 8, "n_epochs": 30, "dpo_beta": 0.5}
    job = make_job(tmp_path, tiny_model, job_id="ft-dpo-full", hyper=hyper, rows=PAIRS, method="dpo")
    assert run_in_process(job) == 0, job.result()
    _learned(job)
    assert (job.local(final_prefix("ft-dpo-full", "model")) / "model.safetensors").is_file()


def test_resume_keeps_the_reference_and_equals_an_uninterrupted_run(tmp_path, tiny_model):
    hyper = {"batch_size": 4, "n_epochs": 2, "n_checkpoints": 2, "seed": 3, "dpo_beta": 0.5, "learning_rate": 5e-3}
    first = make_job(tmp_path, tiny_model, job_id="ft-dpo-seed", hyper=hyper, rows=PAIRS, method="dpo")
    assert run_in_process(first) == 0, first.result()
    losses = first.metric("train/loss")
    assert len(losses) == 4
    adapter = first.local(final_prefix("ft-dpo-seed", "adapter")) / "adapter_model.safetensors"
    uninterrupted = load_file(adapter)
    resumed = make_job(tmp_path, tiny_model, job_id="ft-dpo-seed", hyper=hyper, rows=PAIRS, method="dpo", attempt=1,
                       resume=Resume(key=checkpoint_prefix("ft-dpo-seed", 2), step=2))  # fmt: skip
    assert run_in_process(resumed) == 0, resumed.result()
    start = next(e for e in resumed.events() if e["type"] == "training_start")["message"]
    assert "kept from the checkpoint" in start
    assert resumed.metric("train/loss") == pytest.approx(losses[2:], rel=1e-5)
    assert resumed.metric("train/rewards/margins") == pytest.approx(first.metric("train/rewards/margins")[2:], abs=1e-5)
    after = load_file(adapter)
    assert all((after[k] - uninterrupted[k]).abs().max() < 1e-6 for k in uninterrupted)


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        (conversations(), "no usable preference pairs"),  # SFT data is not preference data
        (
            [
                {
                    "input": {"messages": [{"role": "user", "content": "hi"}]},
                    "preferred_output": [],
                    "non_preferred_output": [{"role": "assistant", "content": "x"}],
                }
            ],
            "no usable preference pairs",
        ),
    ],
)
def test_bad_preference_data_stops_before_training(tmp_path, tiny_model, rows, words):
    job = make_job(tmp_path, tiny_model, job_id="ft-dpo-bad", rows=rows, method="dpo")
    assert run_in_process(job) == 1
    result = job.result()
    assert result["status"] == "user_error" and words in result["message"]
    assert "training_start" not in job.types()


def test_micro_batches_and_evaluations(tmp_path, tiny_model):
    """A step's loss is the mean over its pairs however it is split: 2 micro-batches give 1's curve (in fp32: under
    bf16 autocast, differently padded forwards round differently, ~1e-3 in a sequence's log-probability);
    evaluations on a validation file report loss, margin and reward accuracy."""
    hyper = {"batch_size": 8, "n_epochs": 3, "seed": 5, "dpo_beta": 0.5, "learning_rate": 5e-3}
    one = make_job(tmp_path, tiny_model, job_id="ft-dpo-one", hyper=hyper, rows=PAIRS, method="dpo", dtype="fp32")
    assert run_in_process(one) == 0, one.result()
    two = make_job(tmp_path, tiny_model, job_id="ft-dpo-two", hyper=hyper | {"gradient_accumulation_steps": 2,
                   "n_evals": 3}, rows=PAIRS, validation=PAIRS[:4], method="dpo", dtype="fp32")  # fmt: skip
    assert run_in_process(two) == 0, two.result()
    assert two.metric("train/loss") == pytest.approx(one.metric("train/loss"), rel=1e-5)
    assert two.metric("train/rewards/margins") == pytest.approx(one.metric("train/rewards/margins"), abs=1e-5)
    assert two.metric("train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the policy is the reference
    evals = [r["values"] for r in two.records() if r["kind"] == "metric" and "eval/loss" in r["values"]]
    assert len(evals) == 3 and all(set(e) == {"eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"}
                                   for e in evals)  # fmt: skip
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"]
    assert two.types().count("eval_complete") == 3
