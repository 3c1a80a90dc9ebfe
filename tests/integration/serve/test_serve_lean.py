"""The lean decoding forward (`serve/lean.py`) computes what transformers' forward computes: an engine with it and
one without give the same tokens and log-probabilities, with mixed adapters, on llama (no biases) and qwen2 (q/k/v
biases); an architecture it does not cover (qwen3's q/k norms) is left to transformers' forward and still served."""

from __future__ import annotations

import pytest
import torch
from serve_support import collect_all, greedy, ids, make_adapter, prompt, run

from tuneforge.serve.engine import TransformersEngine
from tuneforge.serve.lean import LeanDecoder
from tuneforge.serve.types import GenerationRequest
from tuneforge.train.hardware import bf16_is_fast
from tuneforge.train.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def arch_model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(f"lean-{request.param}")
    folder = save_tiny_model(root / "model", request.param, tie=False, layers=3)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # clear greedy choices (see conftest)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)  # qwen2's q/k/v biases start at zero: make them count
    model.save_pretrained(folder)
    adapters = {
        "x": make_adapter(folder, root / "x", seed=11, r=4, alpha=8),
        "y": make_adapter(folder, root / "y", seed=12, r=8, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
    }
    return request.param, folder, adapters


def _outputs(folder, adapters, *, lean: bool, dtype: torch.dtype):
    engine = TransformersEngine(folder, dtype=dtype, max_loras=2, lean_decode=lean)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    names = [None, "x", "y"]
    reqs = [
        GenerationRequest(f"r{i}", prompt(i, 3 + (i * 5) % 17), greedy(6 + (i * 7) % 19, top_logprobs=2), names[i % 3])
        for i in range(12)
    ]
    engine.start()
    try:
        return engine.lean is not None, run(collect_all(engine, reqs), timeout=120)
    finally:
        engine.stop()


def test_lean_decode_equals_transformers_forward(arch_model):
    arch, folder, adapters = arch_model
    used, lean = _outputs(folder, adapters, lean=True, dtype=torch.float32)
    assert used == (arch != "qwen3")  # qwen3's q/k norms are not covered: transformers' forward serves it
    _, plain = _outputs(folder, adapters, lean=False, dtype=torch.float32)
    for a, b in zip(lean, plain, strict=True):
        assert ids(a) == ids(b)
        assert [t.logprob for t in a] == pytest.approx([t.logprob for t in b], abs=1e-5)
        assert [[i for i, _ in t.top_logprobs] for t in a] == [[i for i, _ in t.top_logprobs] for t in b]
    assert len({tuple(ids(o)) for o in lean}) > 6  # prompts and adapters give different answers


@pytest.mark.skipif(not bf16_is_fast(torch.device("cpu")), reason="no fast bf16 on this CPU (emulated, slow)")
def test_lean_decode_in_bf16_matches_transformers_forward(arch_model):
    """bf16: the lean path runs the same operations (the model's own norms, projections and rotary; attention in
    the same kernel with the query heads of a key/value head as rows), so the outputs agree closely; required:
    every answer's first 4 tokens equal and the log-probabilities within 0.05 where the tokens agree."""
    arch, folder, adapters = arch_model
    if arch == "qwen3":
        pytest.skip("not a lean architecture")
    _, lean = _outputs(folder, adapters, lean=True, dtype=torch.bfloat16)
    _, plain = _outputs(folder, adapters, lean=False, dtype=torch.bfloat16)
    for a, b in zip(lean, plain, strict=True):
        assert ids(a)[:4] == ids(b)[:4]
        same = [(x.logprob, y.logprob) for x, y in zip(a, b, strict=True) if x.token_id == y.token_id]
        assert all(abs(x - y) <= 0.05 for x, y in same)


def test_supports_refuses_blocks_it_does_not_model(tmp_path):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "l", "llama"), dtype=torch.float32)
    assert LeanDecoder.supports(llama)
    qwen3 = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "q", "qwen3"), dtype=torch.float32)
    assert not LeanDecoder.supports(qwen3)
    llama.config.pretraining_tp = 2  # llama's sliced projections: not modelled
    assert not LeanDecoder.supports(llama)
