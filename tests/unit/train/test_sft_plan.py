"""The arithmetic around an SFT run: learning-rate schedule, evaluation and checkpoint steps, the seeded data order
(steps of `batch_size` examples, packed or not), memory-sized chunks and `batch_size="max"`, the recipe table, and how
`python -m tuneforge.train` reports failures."""

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tuneforge.errors import InvalidRequestError
from tuneforge.train import __main__ as entry
from tuneforge.train import registry
from tuneforge.train.batching import (
    IGNORE,
    collate,
    lay_out,
    make_row,
    micro_batches,
    pack_rows,
    plan_epoch,
    position_ids,
    split_by_tokens,
    steps_per_epoch,
)
from tuneforge.train.hardware import bf16_is_fast, max_batch_examples, plan_memory
from tuneforge.train.registry import Outcome
from tuneforge.train.schedule import (
    checkpoint_steps,
    evenly_spaced,
    lr_factor,
    make_scheduler,
    warmup_steps_for,
)
from tuneforge.train.spec import Hyper, ModelSource, TrainSpec, standalone_plan


def test_warmup_then_linear_decay_to_the_floor():
    f = [lr_factor(s, total_steps=10, warmup_steps=2, kind="linear", min_lr_ratio=0.1) for s in range(11)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[2:]))
    assert f[10] == pytest.approx(0.1)


def test_cosine_with_min_lr_ratio_and_cycles():
    half = [lr_factor(s, total_steps=100, warmup_steps=0, kind="cosine", min_lr_ratio=0.2) for s in (0, 50, 100)]
    assert half == pytest.approx([1.0, 0.6, 0.2])
    full = [lr_factor(s, total_steps=100, warmup_steps=0, kind="cosine", num_cycles=1.0) for s in (0, 50, 100)]
    assert full == pytest.approx([1.0, 0.0, 1.0], abs=1e-9)


def test_the_scheduler_applies_the_factor_to_the_peak():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=0.1)
    hp = Hyper(lr_scheduler_type="linear", warmup_ratio=0.25, min_lr_ratio=0.0)
    sched = make_scheduler(opt, hyper=hp, total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.1 * (1 - 5 / 6))
    assert warmup_steps_for(0.01, 8) == 1 and warmup_steps_for(0.0, 8) == 0


def test_evaluations_and_checkpoints_are_evenly_spaced_and_never_duplicate_the_final_save():
    assert evenly_spaced(4, 100) == [25, 50, 75, 100]
    assert evenly_spaced(10, 3) == [1, 2, 3]
    assert evenly_spaced(0, 100) == []
    assert checkpoint_steps(1, 100) == []  # the final weights are the one checkpoint
    assert checkpoint_steps(4, 100) == [25, 50, 75]


def test_the_data_order_is_seeded_and_cuts_each_epoch_into_steps_of_batch_size_examples():
    a = plan_epoch(300, batch_size=8, seed=1, epoch=0)
    assert a == plan_epoch(300, batch_size=8, seed=1, epoch=0)  # a pure function: a resumed run replays it
    assert a != plan_epoch(300, batch_size=8, seed=1, epoch=1)
    assert a != plan_epoch(300, batch_size=8, seed=2, epoch=0)
    assert sorted(i for s in a for i in s) == list(range(300))  # every example once per epoch
    assert [len(s) for s in a] == [8] * 37 + [4]  # the last step takes what is left
    assert len(a) == steps_per_epoch(300, 8) == 38
    assert [i for s in a for i in s] != list(range(300))  # shuffled


@pytest.mark.parametrize(
    ("examples", "batch_size", "steps"), [(24, 8, 3), (25, 8, 4), (7, 8, 1), (8, 1, 8), (1, 64, 1)]
)
def test_steps_per_epoch_is_the_ceiling_of_examples_over_batch_size(examples, batch_size, steps):
    assert steps_per_epoch(examples, batch_size) == len(plan_epoch(examples, batch_size=batch_size, seed=0, epoch=0))
    assert steps_per_epoch(examples, batch_size) == steps


def test_micro_batches_split_a_step_without_losing_or_adding_an_example():
    step = [5, 3, 9, 1, 7, 2, 8]
    assert micro_batches(step, 1) == [step]
    assert micro_batches(step, 3) == [[5, 3, 9], [1, 7], [2, 8]]
    assert micro_batches(step, 10) == [[i] for i in step]  # never an empty micro-batch
    assert micro_batches([], 4) == []


def _rows(lengths):
    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        ids = rng.integers(4, 100, size=n).tolist()
        rows.append(make_row(ids, [IGNORE] * (n // 2) + ids[n // 2 :]))
    return rows


def test_packing_a_steps_examples_keeps_every_target_and_never_crosses_a_border():
    rows = _rows([5, 30, 12, 7, 20, 3, 9])
    packed = pack_rows(rows, capacity=32)
    assert all(r.length <= 32 for r in packed) and len(packed) < len(rows)
    assert sorted(n for r in packed for n in r.seq_lens) == sorted(r.length for r in rows)
    assert sum(r.trained for r in packed) == sum(r.trained for r in rows)
    want = sorted(tuple(r.targets.tolist()) for r in rows)
    got = []
    for r in packed:  # cut each packed row back at its examples' borders: the same targets as alone
        bounds = np.cumsum((0, *r.seq_lens)).tolist()
        got.extend(tuple(r.targets[a:b].tolist()) for a, b in itertools.pairwise(bounds))
    assert sorted(got) == want
    assert pack_rows(rows, capacity=4)[0].length == 30  # longer than the capacity: alone
    assert [r.length for r in lay_out(rows, None)] == sorted((r.length for r in rows), reverse=True)
    assert len(lay_out(rows, 1000)) == 1
    batch = collate(lay_out(rows, 1000), pad_id=0)
    assert batch["position_ids"][0, :5].tolist() == [0, 1, 2, 3, 4] and batch["position_ids"][0, 30].item() == 0


def test_chunks_respect_the_token_budget_but_keep_at_least_one_row():
    lengths = [10, 300, 20, 30, 40]
    chunks = split_by_tokens(range(5), lengths, budget_tokens=64)
    assert sorted(i for c in chunks for i in c) == list(range(5))
    assert [1] in chunks  # longer than the budget: alone
    assert all(len(c) * max(lengths[i] for i in c) <= 64 for c in chunks if c != [1])


def test_position_ids_restart_per_example_and_padding_continues():
    assert position_ids([3, 2], 7).tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_batch_size_max_for_smollm2_at_512_stays_modest_on_a_cpu():
    smol = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)
    plan = plan_memory(smol, total_params=134_515_008, trainable_params=4_884_480, longest_row=512,
                       device=torch.device("cpu"), free_bytes=22 << 30)  # fmt: skip
    examples = max_batch_examples(plan, 512)
    assert 1 <= examples <= 4 and not plan.activation_checkpointing
    estimate = plan.static_bytes + examples * 512 * plan.bytes_per_token
    assert estimate < 12 << 30  # well below the 24 GB machine
    tight = plan_memory(smol, total_params=134_515_008, trainable_params=4_884_480, longest_row=8192,
                        device=torch.device("cpu"), free_bytes=8 << 30)  # fmt: skip
    assert tight.activation_checkpointing and max_batch_examples(tight, 8192) == 1
    # Short examples: more of them per step, but never more than one forward's tokens, and at most 64.
    short = plan_memory(smol, total_params=134_515_008, trainable_params=4_884_480, longest_row=60,
                        device=torch.device("cpu"), free_bytes=22 << 30)  # fmt: skip
    assert max_batch_examples(short, 40) * 40 <= short.tokens_per_forward <= 2048
    assert max_batch_examples(short, 40) > 4 and max_batch_examples(short, 1) == 64
    assert max_batch_examples(short, 1, most=16) == 16  # the job's limit (its model's max batch size) bounds it


def test_bf16_is_only_used_where_it_is_fast():
    fast = bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    assert bf16_is_fast(torch.device("cpu")) is fast


def test_the_recipe_table_is_torch_free_and_refuses_unknown_or_reserved_names(monkeypatch):
    assert registry.available() == ["sft", "dpo"]
    with pytest.raises(InvalidRequestError, match="unknown"):
        registry.load_recipe("ppo")
    assert callable(registry.load_recipe("sft")) and callable(registry.load_recipe("dpo"))
    monkeypatch.setitem(registry.RECIPES, "dpo", None)  # a name reserved for a recipe not built
    assert registry.available() == ["sft"]
    with pytest.raises(InvalidRequestError, match="not available"):
        registry.load_recipe("dpo")


# ---- the entry point: one result line per run, whatever happens --------------------------------------------------


def _spec_file(tmp_path, method="sft", **changes):
    plan = standalone_plan(ModelSource(name="m", source_kind="local", source=str(tmp_path)), Hyper(), method=method)
    base = dict(
        job_id="ft-main", plan=plan, storage_url=str(tmp_path / "blobs"), cache_dir=str(tmp_path / "c"),
        work_dir=str(tmp_path / "w"),
        events_path=str(tmp_path / "w" / "events.jsonl"), training_file_key="files/f", output_prefix="jobs/ft-main",
        output_name="me/m",
    )  # fmt: skip
    spec = TrainSpec(**(base | changes))
    path = tmp_path / "spec.json"
    path.write_bytes(spec.to_json())
    return path, spec


def _results(spec):
    with open(spec.events_path) as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == "result"]


@pytest.mark.parametrize(
    ("raised", "status", "code", "words"),
    [
        (InvalidRequestError("Every token of the training file is masked"), "user_error", 1, "masked"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "error", 1, "smaller batch_size"),
        (KeyError("model.embed_tokens.weight"), "error", 1, "KeyError"),
    ],
)
def test_every_failure_ends_with_one_readable_result(tmp_path, monkeypatch, raised, status, code, words):
    path, spec = _spec_file(tmp_path)

    def recipe(spec, out, stop):
        out.event("training_start", "started")
        raise raised

    monkeypatch.setattr(entry, "load_recipe", lambda name: recipe)
    assert entry.main([str(path)]) == code
    [result] = _results(spec)
    assert result["status"] == status and words in result["message"]


def test_a_reserved_recipe_is_a_user_error_and_a_completed_run_exits_zero(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.RECIPES, "dpo", None)
    path, spec = _spec_file(tmp_path, method="dpo")
    assert entry.main([str(path)]) == 1
    assert _results(spec)[0]["status"] == "user_error"

    path, spec = _spec_file(tmp_path, job_id="ft-ok", events_path=str(tmp_path / "ok.jsonl"))
    monkeypatch.setattr(entry, "load_recipe", lambda name: lambda s, o, stop: Outcome("completed", "done", {"step": 3}))
    assert entry.main([str(path)]) == 0
    assert _results(spec) == [{**_results(spec)[0], "status": "completed", "message": "done", "data": {"step": 3}}]


def test_a_missing_spec_exits_2(tmp_path, capsys):
    assert entry.main([str(tmp_path / "nope.json")]) == 2
    assert "cannot read the training spec" in capsys.readouterr().err
    assert entry.main([]) == 2
