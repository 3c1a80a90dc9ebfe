"""The lean decoding forward (`serve/lean.py`) computes what transformers' forward computes: an engine with it and
one without give the same tokens and log-probabilities, with mixed adapters, on llama (no biases) and qwen2 (q/k/v
biases), through torch's operations and through the fused CPU kernels (`serve/kernels`); an architecture it does
not cover (qwen3's q/k norms) is left to transformers' forward and still served."""

from __future__ import annotations

import threading

import pytest
import torch
from serve_support import collect_all, greedy, ids, make_adapter, prompt, run

from tuneforge.serve.engine import TransformersEngine
from tuneforge.serve.lean import LeanDecoder
from tuneforge.serve.packed import Linear, packing_available
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


# Which adapters a batch's requests use: the base and two adapters mixed (with top log-probabilities: the sampling
# path over fp32 logits), or all one (only each token's own log-probability: the one-pass kernel over the raw
# logits where the kernels are on). The fused decoding step runs a different computation for each: the base
# weights alone, one adapter's low-rank terms, every adapter's masked to each row's slot.
BATCHES = {"mixed": [None, "x", "y"], "base": [None], "one-adapter": ["y"]}


def _outputs(folder, adapters, *, lean: bool, dtype: torch.dtype, fused: bool = False, batch: str = "mixed",
             packed: bool = True):  # fmt: skip
    engine = TransformersEngine(
        folder, dtype=dtype, max_loras=2, lean_decode=lean, fused_kernels=fused, packed_weights=packed
    )
    assert (engine.lean is not None and engine.lean.kernels is not None) == (lean and fused and engine.lean is not None)
    # the fused forwards' matmuls run on prepacked weights exactly where asked for, in bf16
    fused_on = engine.lean is not None and engine.lean.kernels is not None
    want_packed = fused_on and packed and dtype == torch.bfloat16 and packing_available(engine.head.weight)
    assert engine.stats().extra["packed_weights"] == float(want_packed)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    names = BATCHES[batch]
    top = 2 if batch == "mixed" else 0
    reqs = [
        GenerationRequest(
            f"r{i}", prompt(i, 3 + (i * 5) % 17), greedy(6 + (i * 7) % 19, top_logprobs=top), names[i % len(names)]
        )
        for i in range(12)
    ]
    engine.start()
    try:
        return engine.lean is not None, run(collect_all(engine, reqs), timeout=120)
    finally:
        engine.stop()


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("fused", [False, True], ids=["torch-ops", "fused-kernels"])
def test_lean_decode_equals_transformers_forward(arch_model, fused, batch):
    """fp32: the same tokens, and log-probabilities within 1e-5 through torch's operations (the same operations
    in the same order); the kernels sum in another order (attention's softmax and weighted sum in one pass), and
    the tiny model's sharpened head (x30) magnifies that: within 1e-4 there."""
    arch, folder, adapters = arch_model
    used, lean = _outputs(folder, adapters, lean=True, dtype=torch.float32, fused=fused, batch=batch)
    assert used == (arch != "qwen3")  # qwen3's q/k norms are not covered: transformers' forward serves it
    _, plain = _outputs(folder, adapters, lean=False, dtype=torch.float32, batch=batch)
    for a, b in zip(lean, plain, strict=True):
        assert ids(a) == ids(b)
        assert [t.logprob for t in a] == pytest.approx([t.logprob for t in b], abs=1e-4 if fused else 1e-5)
        assert [[i for i, _ in t.top_logprobs] for t in a] == [[i for i, _ in t.top_logprobs] for t in b]
    assert len({tuple(ids(o)) for o in lean}) > 6  # prompts and adapters give different answers
    if batch != "mixed":
        assert all(t.top_logprobs == () for o in lean for t in o)


@pytest.mark.skipif(not bf16_is_fast(torch.device("cpu")), reason="no fast bf16 on this CPU (emulated, slow)")
def test_lean_decode_in_bf16_matches_transformers_forward(arch_model):
    """bf16 through torch's operations: the lean path runs the same operations (the model's own norms, projections
    and rotary; attention in the same kernel with the query heads of a key/value head as rows), so the outputs
    agree closely; required: every answer's first 4 tokens equal and the log-probabilities within 0.05 where the
    tokens agree."""
    arch, folder, adapters = arch_model
    if arch == "qwen3":
        pytest.skip("not a lean architecture")
    _, lean = _outputs(folder, adapters, lean=True, dtype=torch.bfloat16)
    _, plain = _outputs(folder, adapters, lean=False, dtype=torch.bfloat16)
    for a, b in zip(lean, plain, strict=True):
        assert ids(a)[:4] == ids(b)[:4]
        same = [(x.logprob, y.logprob) for x, y in zip(a, b, strict=True) if x.token_id == y.token_id]
        assert all(abs(x - y) <= 0.05 for x, y in same)


@pytest.mark.skipif(not bf16_is_fast(torch.device("cpu")), reason="no fast bf16 on this CPU (emulated, slow)")
@pytest.mark.parametrize("batch", ["mixed", "base"])
def test_packed_weights_give_the_same_answers(arch_model, batch, monkeypatch):
    """bf16 through the fused kernels, with the projections' and the head's weights prepacked for oneDNN
    (`serve/packed.py`) and without: the same tokens and log-probabilities (oneDNN's blocked matmul gives the same
    bits as its plain one). Packing runs on the thread building the engine's matmuls, never the main thread
    (`serve/threads.py`): the engine is made here on the main thread."""
    arch, folder, adapters = arch_model
    if arch == "qwen3":
        pytest.skip("not a lean architecture")
    threads = []
    pack = Linear._pack

    def recording(self, rows_hint):
        threads.append(threading.current_thread())
        return pack(self, rows_hint)

    monkeypatch.setattr(Linear, "_pack", recording)
    _, packed = _outputs(folder, adapters, lean=True, dtype=torch.bfloat16, fused=True, batch=batch)
    assert threads and threading.main_thread() not in threads
    _, plain = _outputs(folder, adapters, lean=True, dtype=torch.bfloat16, fused=True, batch=batch, packed=False)
    for a, b in zip(packed, plain, strict=True):
        assert ids(a) == ids(b)
        assert [t.logprob for t in a] == [t.logprob for t in b]


def _error_against(outputs, reference):
    """How far bf16 answers stay from the fp32 ones: the tokens that agree before each answer's first difference,
    and the mean absolute log-probability error over them."""
    agree, errors = 0, []
    for a, b in zip(outputs, reference, strict=True):
        for x, y in zip(a, b, strict=False):
            if x.token_id != y.token_id:
                break
            agree += 1
            errors.append(abs(x.logprob - y.logprob))
    return agree, sum(errors) / len(errors)


@pytest.mark.skipif(not bf16_is_fast(torch.device("cpu")), reason="no fast bf16 on this CPU (emulated, slow)")
@pytest.mark.parametrize("batch", list(BATCHES))
def test_fused_kernels_in_bf16_are_as_accurate_as_transformers(arch_model, batch):
    """bf16 through the fused kernels: their attention computes in fp32 where SDPA rounds, so a hidden state may
    differ from transformers' by a unit in the last place, which this tiny model's sharpened head (x30) turns into
    log-probability differences of up to ~0.5. Measured against the fp32 answers instead, both must be as close:
    the fused path keeps at least 80% of transformers' agreeing tokens (the tokens before each answer's first
    difference: chaotic, either may lose a few), with a mean log-probability error at most 1.5x transformers'
    (+0.005). Measured, tokens agreeing of 173, transformers vs fused: llama mixed 124 / 119, base 173 / 173,
    one adapter 114 / 100; qwen2 161 / 168, 173 / 173, 149 / 156; errors within 1.1x."""
    arch, folder, adapters = arch_model
    if arch == "qwen3":
        pytest.skip("not a lean architecture")
    _, reference = _outputs(folder, adapters, lean=False, dtype=torch.float32, batch=batch)
    _, plain = _outputs(folder, adapters, lean=False, dtype=torch.bfloat16, batch=batch)
    _, fused = _outputs(folder, adapters, lean=True, dtype=torch.bfloat16, fused=True, batch=batch)
    plain_agree, plain_error = _error_against(plain, reference)
    fused_agree, fused_error = _error_against(fused, reference)
    assert plain_agree >= 0.5 * sum(len(r) for r in reference)  # bf16 itself stays close on this model (124 of 173)
    assert fused_agree >= 0.8 * plain_agree
    assert fused_error <= 1.5 * plain_error + 0.005


def test_supports_refuses_blocks_it_does_not_model(tmp_path):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "l", "llama"), dtype=torch.float32)
    assert LeanDecoder.supports(llama)
    qwen3 = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "q", "qwen3"), dtype=torch.float32)
    assert not LeanDecoder.supports(qwen3)
    llama.config.pretraining_tp = 2  # llama's sliced projections: not modelled
    assert not LeanDecoder.supports(llama)
