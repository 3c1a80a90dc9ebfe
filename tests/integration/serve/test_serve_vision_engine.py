"""The vision-language engine (`serve/vision_engine.py`) on a tiny Idefics3: its greedy tokens are transformers'
`generate` (prefill with pixels, then one cached forward per token), with each token's log-probability under the
raw logits; a seeded sampled request repeats; an adapter's tokens are the merged model's while the base keeps its
own; what it cannot serve is refused before any token; the text engine refuses images."""

from __future__ import annotations

import pytest
import torch
from serve_support import collect, greedy, run
from vision_support import COLOURS, data_url, image_message

from tuneforge.data.tokenization.chat import prompt_ids
from tuneforge.serve.types import EngineError, GenerationRequest, PromptTooLong, SamplingParams, UnknownAdapter
from tuneforge.serve.vision_engine import VisionEngine
from tuneforge.train.tiny_models import save_tiny_vlm
from tuneforge.train.vision import load_processor, pixel_inputs

RED = data_url(COLOURS["red"])


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    # embeddings (tied to the head) x4: greedy choices clear of fp32 noise, log-probabilities far from 0
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "idefics3", embedding_scale=4.0)


@pytest.fixture(scope="module")
def adapter_dir(vlm_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32)
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        exclude_modules=r".*\b(vision_model|connector)\b.*")  # fmt: skip
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp("vlm-adapter") / "a"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine(vlm_dir):
    e = VisionEngine(vlm_dir, dtype=torch.float32, max_loras=1)
    e.start()
    yield e
    e.stop()


def _request(vt, *, sampling, adapter=None, images=(RED,), request_id="r"):
    messages = [image_message(url) for url in images] or [{"role": "user", "content": "What colour?"}]
    ids = prompt_ids(messages, None, vt)
    return GenerationRequest(request_id, tuple(ids), sampling, adapter=adapter, images=tuple(images))


def _reference(folder, req, n, adapter=None):
    """transformers' greedy generate on the same ids and pixels (the merged adapter where given)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    ids = torch.tensor([req.prompt_ids])
    pixels = pixel_inputs(load_processor(folder), [req.images])
    with torch.no_grad():
        out = model.generate(input_ids=ids, **pixels, max_new_tokens=n, do_sample=False, eos_token_id=None,
                             return_dict_in_generate=True, output_logits=True)  # fmt: skip
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


def test_greedy_tokens_and_logprobs_are_transformers_generate(engine, vlm_dir):
    req = _request(engine.processor, sampling=greedy(6))
    got = run(collect(engine, req))
    tokens, logprobs = _reference(vlm_dir, req, 6)
    assert [t.token_id for t in got] == tokens
    assert [t.logprob for t in got] == pytest.approx(logprobs, abs=1e-4)
    assert got[-1].finish_reason == "length" and all(t.finish_reason is None for t in got[:-1])
    other = run(collect(engine, _request(engine.processor, sampling=greedy(6), images=(data_url(COLOURS["blue"]),))))
    assert len(other) == 6  # another image: a prompt of the same length, pixels of its own


def test_a_seeded_sample_repeats_and_top_logprobs_are_reported(engine):
    sampling = SamplingParams(max_tokens=5, temperature=1.0, top_k=20, seed=3, top_logprobs=3)
    first = run(collect(engine, _request(engine.processor, sampling=sampling, request_id="a")))
    second = run(collect(engine, _request(engine.processor, sampling=sampling, request_id="b")))
    assert [t.token_id for t in first] == [t.token_id for t in second]
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0][1] >= t.logprob - 1e-6 for t in first)


def test_an_adapter_serves_the_merged_weights_and_the_base_keeps_its_own(engine, vlm_dir, adapter_dir):
    base_req = _request(engine.processor, sampling=greedy(6), request_id="base")
    before = [(t.token_id, t.logprob) for t in run(collect(engine, base_req))]
    engine.load_adapter("ad", adapter_dir)
    tuned = run(collect(engine, _request(engine.processor, sampling=greedy(6), adapter="ad", request_id="ad")))
    tokens, logprobs = _reference(vlm_dir, base_req, 6, adapter=adapter_dir)
    assert [t.token_id for t in tuned] == tokens
    assert [t.logprob for t in tuned] == pytest.approx(logprobs, abs=1e-4)
    assert [t.logprob for t in tuned] != pytest.approx([lp for _, lp in before], abs=1e-3)  # the adapter counts
    assert [(t.token_id, t.logprob) for t in run(collect(engine, base_req))] == before
    assert engine.stats().adapters is not None and engine.stats().adapters.loaded == ("ad",)
    engine.unload_adapter("ad")
    with pytest.raises(UnknownAdapter):
        run(collect(engine, _request(engine.processor, sampling=greedy(2), adapter="ad", request_id="gone")))
    assert [(t.token_id, t.logprob) for t in run(collect(engine, base_req))] == before  # no adapter left
    engine.load_adapter("ad", adapter_dir)  # and one loads again
    again = run(collect(engine, _request(engine.processor, sampling=greedy(6), adapter="ad", request_id="ad2")))
    assert [t.token_id for t in again] == tokens
    engine.load_adapter("ad-b", adapter_dir)  # max_loras=1: the least recently used one makes room
    stats = engine.stats().adapters
    assert stats is not None and stats.loaded == ("ad-b",) and stats.evictions == 1
    with pytest.raises(UnknownAdapter):
        run(collect(engine, _request(engine.processor, sampling=greedy(2), adapter="ad", request_id="evicted")))


def test_what_it_cannot_serve_is_refused_before_any_token(engine):
    vt = engine.processor
    with pytest.raises(EngineError, match="response_format"):
        run(collect(engine, _request(vt, sampling=SamplingParams(max_tokens=2, json_schema="{}"))))
    long = GenerationRequest("long", tuple([5] * engine.max_context), greedy(2))
    with pytest.raises(PromptTooLong):
        run(collect(engine, long))
    with pytest.raises(EngineError, match="outside the vocabulary"):
        run(collect(engine, GenerationRequest("oov", (10**6,), greedy(2))))


def test_the_text_engine_refuses_images(tiny_dir):
    from tuneforge.serve.engine import TransformersEngine

    text = TransformersEngine(tiny_dir, dtype=torch.float32, fused_kernels=False)
    text.start()
    try:
        with pytest.raises(EngineError, match="reads text only"):
            run(collect(text, GenerationRequest("img", (5, 6, 7), greedy(2), images=(RED,))))
    finally:
        text.stop()
