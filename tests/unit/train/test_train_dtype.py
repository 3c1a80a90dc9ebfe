"""The training dtype: TUNEFORGE_TRAIN_DTYPE -> Settings.train_dtype -> TrainSpec.dtype (build_spec) -> the compute
dtype of the run (`hardware.compute_dtype`): auto takes bf16 only where it is fast, forced values are obeyed."""

import msgspec
import pytest
import torch
from pydantic import ValidationError

from tuneforge.jobs.specs import build_spec
from tuneforge.settings import Settings
from tuneforge.store.tables import JobRow
from tuneforge.train import hardware
from tuneforge.train.hardware import compute_dtype
from tuneforge.train.spec import Hyper, ModelSource, TrainSpec, load_spec, standalone_plan

CPU = torch.device("cpu")


@pytest.mark.parametrize("fast", [True, False])
def test_auto_is_bf16_only_where_it_is_fast_and_forced_values_are_obeyed(monkeypatch, fast):
    monkeypatch.setattr(hardware, "bf16_is_fast", lambda device: fast)
    assert compute_dtype("auto", CPU) == (torch.bfloat16 if fast else torch.float32)
    assert compute_dtype("bf16", CPU) == torch.bfloat16
    assert compute_dtype("fp32", CPU) == torch.float32
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        compute_dtype("fp16", CPU)


def test_auto_on_this_machine_follows_its_cpu():
    fast = bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    assert compute_dtype("auto", CPU) == (torch.bfloat16 if fast else torch.float32)


def test_the_setting_reads_its_environment_variable_and_refuses_other_values(monkeypatch, tmp_path):
    assert Settings(home=tmp_path).train_dtype == "auto"
    monkeypatch.setenv("TUNEFORGE_TRAIN_DTYPE", "bf16")
    assert Settings(home=tmp_path).train_dtype == "bf16"
    monkeypatch.setenv("TUNEFORGE_TRAIN_DTYPE", "fp16")
    with pytest.raises(ValidationError):
        Settings(home=tmp_path)


@pytest.mark.parametrize("dtype", ["auto", "fp32", "bf16"])
def test_build_spec_carries_the_setting_into_the_spec(tmp_path, dtype):
    settings = Settings(home=tmp_path, train_dtype=dtype)
    plan = standalone_plan(ModelSource(name="m", source_kind="local", source="/m"), Hyper())
    job = JobRow(id="ft-1", owner="alice", status="queued", model="m", output_name="alice/m-x",
                 training_file=plan.training_file, validation_file=None, request_hash="h", secrets={},
                 params=plan.to_builtins())  # fmt: skip
    spec = build_spec(job, plan, settings=settings, attempt=0, resume_from=None)
    assert spec.dtype == dtype
    assert load_spec(spec.to_json()).dtype == dtype


def test_a_spec_without_dtype_is_auto_and_an_unknown_dtype_is_refused():
    plan = standalone_plan(ModelSource(name="m", source_kind="local", source="/m"), Hyper())
    spec = TrainSpec(job_id="ft-1", plan=plan, storage_url="/b",
                     cache_dir="/c", work_dir="/w", events_path="/w/e.jsonl", training_file_key="files/f",
                     output_prefix="jobs/ft-1", output_name="alice/m-x")  # fmt: skip
    raw = msgspec.json.decode(spec.to_json())
    del raw["dtype"]
    assert load_spec(msgspec.json.encode(raw)).dtype == "auto"
    with pytest.raises(msgspec.ValidationError):
        load_spec(msgspec.json.encode(raw | {"dtype": "fp16"}))
    assert spec.digest() != msgspec.structs.replace(spec, dtype="bf16").digest()  # it changes what the run computes
