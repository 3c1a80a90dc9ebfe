"""Data-parallel processes without starting any: TUNEFORGE_TRAIN_PROCESSES -> Settings.train_processes ->
TrainSpec.processes (build_spec: SFT on a text model only) -> the local executor's command line; the spec's digest
ignores it; a step's examples shared among ranks; a single process's helpers are no-ops; the null event stream."""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import pytest
import torch
from pydantic import ValidationError

from tuneforge.jobs.executors.local import command
from tuneforge.jobs.specs import build_spec
from tuneforge.settings import Settings
from tuneforge.store.tables import JobRow
from tuneforge.train import distributed
from tuneforge.train.distributed import World, shard
from tuneforge.train.events import NullEventWriter
from tuneforge.train.spec import Hyper, JobPlan, ModelSource, TrainSpec, standalone_plan

MODEL = ModelSource(name="m", source_kind="local", source="/m")


def _spec(plan: JobPlan, settings: Settings) -> TrainSpec:
    job = JobRow(id="ft-1", owner="alice", status="queued", model="m", output_name="alice/m-x",
                 training_file=plan.training_file, validation_file=None, request_hash="h", secrets={},
                 params=plan.to_builtins())  # fmt: skip
    return build_spec(job, plan, settings=settings, attempt=0, resume_from=None)


def test_the_setting_feeds_sft_runs_of_text_models_only(monkeypatch, tmp_path):
    assert Settings(home=tmp_path).train_processes == 1
    monkeypatch.setenv("TUNEFORGE_TRAIN_PROCESSES", "4")
    settings = Settings(home=tmp_path)
    assert settings.train_processes == 4
    assert _spec(standalone_plan(MODEL, Hyper()), settings).processes == 4
    assert _spec(standalone_plan(MODEL, Hyper(), method="dpo"), settings).processes == 1
    assert _spec(standalone_plan(MODEL, Hyper(), train_vision=False), settings).processes == 1
    monkeypatch.setenv("TUNEFORGE_TRAIN_PROCESSES", "0")
    with pytest.raises(ValidationError):
        Settings(home=tmp_path)


def test_the_number_of_processes_is_volatile_and_picks_the_command(tmp_path):
    spec = _spec(standalone_plan(MODEL, Hyper()), Settings(home=tmp_path))
    two = msgspec.structs.replace(spec, processes=2)
    assert two.digest() == spec.digest()  # a checkpoint resumes at any number of processes
    raw = msgspec.json.decode(spec.to_json())
    del raw["processes"]
    assert msgspec.json.decode(msgspec.json.encode(raw), type=TrainSpec).processes == 1  # older specs
    assert command(spec, "/w/spec-0.json") == [sys.executable, "-m", "tuneforge.train", "/w/spec-0.json"]
    assert command(two, "/w/spec-0.json") == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
        "tuneforge.train", "/w/spec-0.json",
    ]  # fmt: skip


@pytest.mark.parametrize("size", [2, 3, 4])
def test_a_step_is_shared_without_overlap_and_balanced_in_tokens(size):
    lengths = [50, 7, 300, 12, 12, 90, 41, 8, 160, 33, 5]
    step = [2, 9, 0, 4, 7, 1, 10]  # a step's example indices, in the plan's order
    shares = [shard(step, lengths, World(rank, size)) for rank in range(size)]
    assert sorted(i for share in shares for i in share) == sorted(step)
    tokens = [sum(lengths[i] for i in share) for share in shares]
    assert max(tokens) - min(tokens) <= max(lengths[i] for i in step)  # off by at most the longest example
    assert shard(step[:1], lengths, World(1, 2)) == []  # a rank may have nothing in a short step
    assert shard(step, lengths, World()) == step  # one process: the step as it is, in order


def test_a_single_process_joins_no_group_and_its_helpers_change_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init("cpu") == World()
    assert not torch.distributed.is_initialized()
    assert distributed.is_main() and distributed.size() == 1
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.min_over_ranks(7) == 7
    assert distributed.threads_per_process(None) is None and distributed.threads_per_process(3) == 3
    assert distributed.local_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    distributed.barrier()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.all_reduce_grads([p])
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    distributed.teardown()
    assert not torch.distributed.is_initialized()


def test_ranks_take_their_own_gpu_and_a_share_of_the_threads(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    world = distributed.from_env()
    assert world == World(2, 4, 2)
    assert distributed.local_device(torch.device("cuda"), world) == torch.device("cuda", 2)
    assert distributed.local_device(torch.device("cuda", 1), world) == torch.device("cuda", 3)
    assert distributed.local_device(torch.device("cpu"), world) == torch.device("cpu")
    monkeypatch.setattr(distributed, "_world", world)
    assert distributed.threads_per_process(8) == 2 and distributed.threads_per_process(2) == 1
    assert not distributed.is_main()


def test_the_null_event_stream_writes_nothing(tmp_path):
    out: Any = NullEventWriter()
    out.event("training_start", "x", step=1)
    out.metric(1, loss=1.0)
    out.result("completed", "done")
    out.close()
    assert list(tmp_path.iterdir()) == []
