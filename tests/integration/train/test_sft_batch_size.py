"""`batch_size` counts examples per optimizer step, packing on or off: a run takes ceil(examples / batch_size) x epochs
steps either way, packing only lays a step's examples into rows, so a packed and an unpacked run end at the same
weights; `batch_size="max"` is a number of examples too, kept by a resumed run."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from recipe_support import Job, conversations, make_job, run_in_process
from safetensors.torch import load_file

import tuneforge.train.recipes.common as recipes_common
from tuneforge.storage.layout import checkpoint_prefix, final_prefix
from tuneforge.train.spec import Resume

ROWS = conversations(3)  # 24 short examples: together far under max_seq_length, so packing could make them one row


def _start(job: Job) -> dict[str, Any]:
    return next(e for e in job.events() if e["type"] == "training_start")


def _steps(job: Job) -> list[int]:
    return [r["step"] for r in job.records() if r["kind"] == "progress"]


@pytest.mark.parametrize("accumulation", [1, 3])
def test_24_examples_in_batches_of_8_take_3_steps_an_epoch_packed_or_not(tmp_path, tiny_model, accumulation):
    hyper = {"batch_size": 8, "n_epochs": 2, "gradient_accumulation_steps": accumulation}
    for packing in (True, False):
        name = f"ft-steps-{packing:d}"
        job = make_job(tmp_path, tiny_model, job_id=name, rows=ROWS, hyper=hyper | {"packing": packing})
        assert run_in_process(job) == 0, job.result()
        start = _start(job)
        assert {k: start["data"][k] for k in ("total_steps", "batch_size", "examples")} == {
            "total_steps": 6, "batch_size": 8, "examples": 24
        }  # fmt: skip
        assert "6 steps: 24 examples x 2 epochs, 8 examples per step" in start["message"]
        if packing:
            m = re.search(r"packed into rows of up to ([\d,]+) tokens", start["message"])
            assert m, start["message"]
            tokens = next(e for e in job.events() if e["type"] == "training_data_download_complete")["data"]
            assert tokens["token_count"] <= int(m[1].replace(",", ""))  # all 24 would fit in one packed row
        else:
            assert "8 examples per step (unpacked)" in start["message"]
        assert _steps(job) == list(range(1, 7)) and len(job.metric("train/loss")) == 6
        assert job.result()["data"]["total_steps"] == 6


@pytest.mark.parametrize(("training_type", "lr"), [("lora", 1e-3), ("full", 1e-4)])
def test_packed_and_unpacked_runs_take_the_same_steps_to_the_same_weights(tmp_path, tiny_model, training_type, lr):
    """Both in fp32 (TrainSpec.dtype), even where bf16 autocast is fast: under bf16, two runs of the same math that
    only sum in another order (unpacked with and without gradient accumulation, say) differ by about 3e-3 after 6
    steps. Every trainable tensor within atol 1e-5 / rtol 1e-4 (measured: at most 2e-7 for LoRA at lr 1e-3, 1e-6
    for full training at lr 1e-4, over seeds 1, 2 and 42), while training moved them 350x (LoRA) and 35x (full) further.

    The learning rates are small for a reason: float32 sums in another order (a packed row against padded rows) leave
    gradients equal to about 1e-7 relative, and AdamW divides each update by the root of its squared gradients, which
    turns those roundings into update differences of up to lr x 1e-3 on near-zero gradients. At lr 1e-2 packed and
    unpacked LoRA weights differ by about 2e-5, as do two unpacked runs that differ only in gradient accumulation
    (the same math): rounding, not packing, so only the tolerance would have to grow with the learning rate.
    """
    variant = "adapter" if training_type == "lora" else "model"
    hyper = {"training_type": training_type, "learning_rate": lr, "batch_size": 8, "n_epochs": 2, "lora_dropout": 0.0}
    jobs = {}
    for packing in (True, False):
        name = f"ft-same-{packing:d}"
        packed = hyper | {"packing": packing}
        job = make_job(tmp_path, tiny_model, job_id=name, rows=ROWS, hyper=packed, dtype="fp32")
        assert run_in_process(job) == 0, job.result()
        jobs[packing] = job
    packed, unpacked = jobs[True], jobs[False]
    assert _start(packed)["data"]["total_steps"] == _start(unpacked)["data"]["total_steps"] == 6
    assert _steps(packed) == _steps(unpacked) == list(range(1, 7))
    assert packed.metric("train/loss") == pytest.approx(unpacked.metric("train/loss"), rel=1e-5)
    assert packed.metric("train/grad_norm") == pytest.approx(unpacked.metric("train/grad_norm"), rel=1e-5)

    def weights(job: Job) -> dict[str, torch.Tensor]:
        folder = job.local(final_prefix(job.spec.job_id, variant))
        return load_file(folder / ("adapter_model.safetensors" if variant == "adapter" else "model.safetensors"))

    a, b = weights(packed), weights(unpacked)
    assert a.keys() == b.keys() and a
    far = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4)}
    assert not far, far
    if variant == "adapter":  # lora_B starts at zero: what it holds now is what training did
        moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    else:
        base = load_file(tiny_model / "model.safetensors")
        moved = max((a[k] - base[k]).abs().max().item() for k in a if k in base)
    assert moved > 2e-4  # 20x the tolerance: the comparison is not of weights that barely moved


def test_batch_size_max_counts_examples_and_a_resumed_run_keeps_it(tmp_path, tiny_model, monkeypatch):
    hyper = {"batch_size": "max", "n_epochs": 4, "n_checkpoints": 2}
    sizes = {}
    for packing in (False, True):
        name = f"ft-max-{packing:d}"
        job = make_job(tmp_path, tiny_model, job_id=name, rows=ROWS, hyper=hyper | {"packing": packing})
        assert run_in_process(job) == 0, job.result()
        data = _start(job)["data"]
        assert isinstance(data["batch_size"], int) and 1 <= data["batch_size"] <= 64
        assert data["total_steps"] == -(-24 // data["batch_size"]) * 4
        sizes[packing] = (data["batch_size"], data["total_steps"])
    assert sizes[True] == sizes[False]  # examples of the same data: packing does not change the count

    batch_size, total = sizes[True]
    mid = total // 2
    state = json.loads((job.local(checkpoint_prefix(job.spec.job_id, mid)) / "resume/state.json").read_text())
    assert state["examples_per_step"] == batch_size and "rows_per_batch" not in state
    monkeypatch.setattr(
        recipes_common, "max_batch_examples", lambda plan, length, most: batch_size + 1
    )  # another machine
    resumed = make_job(tmp_path, tiny_model, job_id="ft-max-1", rows=ROWS, hyper=hyper | {"packing": True}, attempt=1,
                       resume=Resume(key=checkpoint_prefix("ft-max-1", mid), step=mid))  # fmt: skip
    assert run_in_process(resumed) == 0, resumed.result()
    data = _start(resumed)["data"]
    assert (data["batch_size"], data["total_steps"], data["step"]) == (batch_size, total, mid)
    assert _steps(resumed) == list(range(mid + 1, total + 1))
    assert "warning" not in resumed.types()  # the same plan: no "data order differs" warning
