"""Adapters in the serving engine: the LRU (count and byte bounds, eviction order, pins, stats), tuneforge's own
saved format, and the adapters refused with a clear message."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
import torch
from serve_support import collect, greedy, ids, make_adapter, prompt, run

from tuneforge.serve.engine import TransformersEngine
from tuneforge.serve.types import EngineError, EngineOverloaded, GenerationRequest, UnknownAdapter
from tuneforge.train.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(120)


def _engine(tiny_dir, **kw) -> TransformersEngine:
    eng = TransformersEngine(tiny_dir, dtype=torch.float32, **kw)
    eng.start()
    return eng


def test_lru_evicts_the_least_recently_used_and_counts(tiny_dir, adapters):
    eng = _engine(tiny_dir, max_loras=2)
    try:
        eng.load_adapter("a", adapters["ad0"])
        eng.load_adapter("b", adapters["ad1"])
        run(collect(eng, GenerationRequest("1", prompt(1, 4), greedy(2), "a")))  # a is now the most recent
        eng.load_adapter("c", adapters["ad2"])  # evicts b
        stats = eng.stats().adapters
        assert stats is not None
        assert stats.loaded == ("a", "c") and stats.count == 2 and stats.evictions == 1
        assert stats.hits == 1 and stats.misses == 0 and stats.max_count == 2
        with pytest.raises(UnknownAdapter, match="evicted"):
            run(collect(eng, GenerationRequest("2", prompt(1, 4), greedy(2), "b")))
        assert eng.stats().adapters.misses == 1
        eng.unload_adapter("a")
        assert eng.stats().adapters.loaded == ("c",)
        with pytest.raises(UnknownAdapter):
            eng.unload_adapter("a")
    finally:
        eng.stop()


def test_an_adapter_in_use_is_never_evicted(tiny_dir, adapters):
    eng = _engine(tiny_dir, max_loras=2)

    async def scenario():
        eng.load_adapter("a", adapters["ad0"])
        eng.load_adapter("b", adapters["ad1"])
        alone_a = ids(await collect(eng, GenerationRequest("x", prompt(2, 5), greedy(100), "a")))
        eng.load_adapter("b", adapters["ad1"])  # already loaded: only marked recent, so a is the oldest
        # a runs until the context is full (2000+ steps): still running, and pinned, whatever the machine's pace
        gen_a = eng.generate(GenerationRequest("ra", prompt(2, 5), greedy(100000), "a"))
        gen_b = eng.generate(GenerationRequest("rb", prompt(3, 5), greedy(20), "b"))
        first = [await anext(gen_a), await anext(gen_b)]
        with pytest.raises(EngineOverloaded, match="in use"):
            eng.load_adapter("c", adapters["ad2"])  # both pinned
        with pytest.raises(EngineError, match="in use"):
            eng.unload_adapter("a")
        _ = [t async for t in gen_b]  # b ends: unpinned; a (older) still runs
        eng.load_adapter("c", adapters["ad2"])
        assert eng.stats().adapters.loaded == ("a", "c")
        async with contextlib.aclosing(gen_a):
            out_a = [first[0]]
            while len(out_a) < 100:
                out_a.append(await anext(gen_a))
        return alone_a, out_a

    try:
        alone_a, out_a = run(scenario())
        assert ids(out_a) == alone_a  # loading c beside the running request did not disturb it
    finally:
        eng.stop()


def test_byte_bound_evicts(tiny_dir, adapters, tmp_path):
    probe = _engine(tiny_dir)
    probe.load_adapter("x", adapters["ad0"])
    size = probe.stats().adapters.bytes
    probe.stop()
    eng = _engine(tiny_dir, max_loras=8, max_lora_bytes=2 * size)
    try:
        for name in ("a", "b", "c"):
            eng.load_adapter(name, adapters["ad0"])
        stats = eng.stats().adapters
        assert stats.loaded == ("b", "c") and stats.bytes == 2 * size and stats.evictions == 1
        with pytest.raises(EngineOverloaded, match="more than the limit"):
            eng.load_adapter("big", make_adapter(tiny_dir, tmp_path / "big", seed=1, r=32))  # 4x ad0's size
    finally:
        eng.stop()


def test_tuneforge_training_save_format_loads(tiny_dir, tmp_path):
    """`train.checkpoints.save_weights` (what a fine-tune writes) gives a folder the engine serves, equal to peft."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.train.checkpoints import save_weights

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    torch.manual_seed(3)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    save_weights(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "out")
    eng = _engine(tiny_dir)
    try:
        eng.load_adapter("ft", tmp_path / "out")
        got = ids(run(collect(eng, GenerationRequest("t", prompt(4, 6), greedy(16), "ft"))))
    finally:
        eng.stop()
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), tmp_path / "out"
    )
    out = ref.generate(
        input_ids=torch.tensor([prompt(4, 6)]),
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=3,
    )
    assert got == out[0, 6:].tolist()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save|lm_head"),
        ({"use_dora": True}, "DoRA"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens|non-LoRA"),
    ],
    ids=["lm_head-modules-to-save", "dora", "embedding-lora"],
)
def test_refused_adapters(tiny_dir, tmp_path, config, message):
    kw = {"targets": config.pop("target_modules", ["q_proj", "v_proj"]), **config}
    folder = make_adapter(tiny_dir, tmp_path / "bad", seed=1, **kw)
    eng = TransformersEngine(tiny_dir, dtype=torch.float32)
    with pytest.raises(EngineError, match=message):
        eng.load_adapter("bad", folder)
    assert eng.stats().adapters.count == 0


def test_lm_head_weights_refused_even_when_the_config_hides_them(tiny_dir, tmp_path, adapters):
    """A saved `lm_head` weight (e.g. modules_to_save stripped from the config by hand) is refused by its key."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sneaky"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((adapters["ad1"] / "adapter_config.json").read_text())
    tensors = load_file(str(adapters["ad1"] / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(384, 64)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    eng = TransformersEngine(tiny_dir, dtype=torch.float32)
    with pytest.raises(EngineError, match="lm_head"):
        eng.load_adapter("x", folder)


def test_adapter_of_another_base_model_refused(tiny_dir, tmp_path):
    other = save_tiny_model(tmp_path / "wide", "llama", hidden=96, tie=False)
    folder = make_adapter(other, tmp_path / "wide_adapter", seed=1)
    eng = TransformersEngine(tiny_dir, dtype=torch.float32)
    with pytest.raises(EngineError, match="another base model"):
        eng.load_adapter("x", folder)
    qwen = save_tiny_model(tmp_path / "qwen", "qwen3", tie=False, layers=3)
    folder = make_adapter(qwen, tmp_path / "qwen_adapter", seed=1)
    with pytest.raises(EngineError, match=r"another architecture|another base model"):
        eng.load_adapter("y", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert asyncio.iscoroutinefunction(collect)
