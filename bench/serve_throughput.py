"""Benchmark: the serving engine's (`tuneforge.serve.engine.TransformersEngine`) generated tokens/s and time to first
token at 1, 8 and 32 concurrent streams, on the base model, one adapter, and spread over 8 adapters.

SmolLM2-135M-Instruct (the catalog's GGUF entry, converted once into --cache) and 8 random-initialised LoRA adapters
of rank 8 / alpha 16 on all linear layers, made here with peft (`get_peft_model`, lora_B drawn N(0, 0.02) so each
adapter changes the output, `save_pretrained`). Each stream is a closed loop: it sends --rounds requests one after
the other, each a random prompt of 32-96 tokens and --tokens generated tokens (stop tokens off, greedy unless
--sampling), so streams end out of step and new requests join a running batch, as on a server. tok/s = all tokens
generated in a scenario / its wall time (prefill time included; all_tok_s also counts the prompt tokens);
TTFT = from `generate()` to the first token, p50 and p99 (nearest rank) over every request of the scenario.

The compute bound is measured in the same run: one pass of 32-row matmuls through every linear weight of the model
(the head included) in the dtype the engine computes in, GFLOP/s, the faster of torch's plain matmul and the one
on weights prepacked as the engine packs them (`serve/packed.py`); bound tok/s = that / (2 x parameters). The
setup's torch work runs in threads that end (`serve.engine.off_thread`: a parallel op on the main thread makes the
engine's step thread ~1.5x slower on a 2-core CPU).
Goals: 32 streams >= 10x one stream (base), mixed 8 adapters >= 0.85x one adapter (32 streams), 32-stream
throughput >= 50% of the bound. Timings drift on a shared machine: compare figures of one run. `fused_kernels` in
the JSON says whether the engine ran its fused CPU kernels (`serve/kernels`; `--no-kernels`: torch's operations,
to compare), `packed_weights` whether their matmuls ran on prepacked weights (`--no-packing`: not).

    python bench/serve_throughput.py [--quick] [--dtype auto|fp32|bf16] [--tokens 64] [--rounds 3] [--sampling]
                                     [--model smollm2|tiny] [--cache DIR] [--bound-seconds 2] [--no-kernels]
                                     [--no-packing]

`--quick`: --tokens 16 --rounds 1 --bound-seconds 0.5. `--model tiny`: a random tiny llama (tests only; its figures
say nothing about throughput). The last line printed is one JSON object (x32_vs_x1, mixed_vs_single, bound_share,
dtype, goals, the bound, and per scenario tok_s, ttft_p50_ms, ttft_p99_ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from tuneforge.catalog.entries import SMOLLM2
from tuneforge.catalog.loading import resolve_model_dir
from tuneforge.serve.engine import TransformersEngine
from tuneforge.serve.packed import Linear
from tuneforge.serve.threads import off_thread
from tuneforge.serve.types import GenerationRequest, SamplingParams
from tuneforge.train.hardware import bf16_is_fast, compute_dtype, set_threads
from tuneforge.train.spec import ModelSource

ADAPTERS = 8


def make_adapters(model_dir: Path, folder: Path, n: int, rank: int = 8) -> list[Path]:
    """`n` peft LoRA adapters (all linear layers) with random A and non-zero random B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    out = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    torch.nn.init.kaiming_uniform_(param, a=math.sqrt(5))
                elif "lora_B" in name:
                    param.normal_(0.0, 0.02)
        model.save_pretrained(folder / f"adapter{i}")
        out.append(folder / f"adapter{i}")
    return out


def matmul_bound(engine: TransformersEngine, rows: int, seconds: float, packed: bool) -> float:
    """GFLOP/s of `rows`-row matmuls through every linear weight of the model, in its dtype (best pass): through
    `torch.nn.functional.linear`, or (`packed`) through weights prepacked as the engine packs them (`serve/packed.py`;
    0.0 where this dtype or machine packs nothing)."""
    weights = [m.weight for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.inference_mode():
        linears = [Linear(w, None, packed, rows) for w in weights]
        if packed and not all(lin.packed is not None for lin in linears):
            return 0.0
        xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
        flops = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
        best, end = math.inf, time.perf_counter() + seconds
        for lin in linears:
            lin(xs[lin.in_features])
        while time.perf_counter() < end:
            t = time.perf_counter()
            for lin in linears:
                lin(xs[lin.in_features])
            best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def scenario(
    engine: TransformersEngine, label: str, streams: int, adapters: list[str | None], rounds: int, tokens: int,
    vocab: int, sampling: bool,
) -> dict[str, Any]:  # fmt: skip
    rng = random.Random(hash(label) & 0xFFFF)
    ttft: list[float] = []
    produced = 0

    async def stream(s: int) -> None:
        nonlocal produced
        for k in range(rounds):
            prompt = tuple(rng.randrange(100, vocab) for _ in range(rng.randint(32, 96)))
            params = SamplingParams(
                max_tokens=tokens, temperature=0.8 if sampling else 0.0, top_p=0.95, seed=s * 1000 + k
            )
            req = GenerationRequest(f"{label}-{s}-{k}", prompt, params, adapters[s % len(adapters)])
            start = time.perf_counter()
            first = True
            async for _ in engine.generate(req):
                if first:
                    ttft.append(time.perf_counter() - start)
                    first = False
                produced += 1

    prefilled = engine.stats().extra["prefill_tokens"]
    start = time.perf_counter()
    await asyncio.gather(*(stream(s) for s in range(streams)))
    wall = time.perf_counter() - start
    prefilled = engine.stats().extra["prefill_tokens"] - prefilled
    return {
        "streams": streams,
        "adapters": len({a for a in adapters if a is not None}),
        "tokens": produced,
        "seconds": round(wall, 3),
        "tok_s": round(produced / wall, 2),
        # prompt and generated tokens per second: the work the bound counts (2 x params per token), prefill included
        "all_tok_s": round((produced + prefilled) / wall, 2),
        "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="--tokens 16 --rounds 1 --bound-seconds 0.5")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="requests per stream, one after the other")
    ap.add_argument("--sampling", action="store_true", help="temperature 0.8 / top_p 0.95 instead of greedy")
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "tuneforge" / "models"))
    ap.add_argument("--bound-seconds", type=float, default=2.0)
    ap.add_argument("--no-kernels", action="store_true", help="torch's operations instead of the fused kernels")
    ap.add_argument("--no-packing", action="store_true", help="the fused forwards' matmuls on unpacked weights")
    a = ap.parse_args()
    if a.quick:
        a.tokens, a.rounds, a.bound_seconds = 16, 1, 0.5

    threads = set_threads(None)
    device = torch.device("cpu")
    dtype = compute_dtype(a.dtype, device)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    print(f"threads {threads}, cpu {torch.backends.cpu.get_cpu_capability()}, bf16 fast: {bf16_is_fast(device)}, "
          f"dtype {name} (--dtype {a.dtype})", flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="tf-serve-bench-"))
    if a.model == "tiny":
        from tuneforge.train.tiny_models import save_tiny_model

        model_dir = save_tiny_model(tmp / "tiny-llama", "llama", tie=False)
    else:
        source = ModelSource(name=SMOLLM2.name, source_kind=SMOLLM2.source_kind, source=SMOLLM2.source)
        model_dir = resolve_model_dir(source, a.cache)
    t = time.perf_counter()
    folders = off_thread(lambda: make_adapters(model_dir, tmp / "adapters", ADAPTERS))
    print(f"model {model_dir}; {ADAPTERS} rank-8 adapters made in {time.perf_counter() - t:.1f}s", flush=True)

    engine = TransformersEngine(
        model_dir, dtype=dtype, max_batch=32, max_loras=ADAPTERS, fused_kernels=not a.no_kernels,
        packed_weights=not a.no_packing,
    )  # fmt: skip
    fused = engine.lean is not None and engine.lean.kernels is not None
    packed = bool(engine.stats().extra["packed_weights"])
    print(f"fused kernels: {fused}, packed weights: {packed}", flush=True)
    names = [f"a{i}" for i in range(ADAPTERS)]
    for n, folder in zip(names, folders, strict=True):
        engine.load_adapter(n, folder)
    unique = {p.data_ptr(): p for p in engine.model.parameters()}  # a tied head counts once
    params = sum(p.numel() for p in unique.values())
    # the bound: the faster of torch's plain matmul and the prepacked one, whichever the engine uses
    plain_gflops = off_thread(lambda: matmul_bound(engine, 32, a.bound_seconds, packed=False))
    packed_gflops = off_thread(lambda: matmul_bound(engine, 32, a.bound_seconds, packed=True))
    gflops = max(plain_gflops, packed_gflops)
    bound = gflops * 1e9 / (2 * params)
    print(f"bound: 32-row matmuls {gflops:.1f} GFLOP/s in {name} (plain {plain_gflops:.1f}, prepacked "
          f"{packed_gflops:.1f}), {params / 1e6:.1f}M params -> {bound:.0f} tok/s", flush=True)  # fmt: skip

    vocab = int(engine.vocab_size)
    plan: list[tuple[str, int, list[str | None]]] = [
        ("base_x1", 1, [None]),
        ("base_x8", 8, [None]),
        ("base_x32", 32, [None]),
        ("single_x32", 32, [names[0]]),
        ("mixed_x1", 1, list(names)),
        ("mixed_x8", 8, list(names)),
        ("mixed_x32", 32, list(names)),
    ]
    engine.start()
    results: dict[str, dict[str, Any]] = {}
    try:
        warm = scenario(engine, "warm", 2, [None, names[0]], 1, 4, vocab, a.sampling)
        asyncio.run(warm)
        for label, streams, adapters in plan:
            results[label] = asyncio.run(
                scenario(engine, label, streams, adapters, a.rounds, a.tokens, vocab, a.sampling)
            )
            r = results[label]
            print(f"{label:11s} {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.1f} ms  "
                  f"p99 {r['ttft_p99_ms']:7.1f} ms  ({r['tokens']} tokens, {r['seconds']} s)", flush=True)  # fmt: skip
        steps = engine.stats().steps
    finally:
        engine.stop()
    x32_vs_x1 = results["base_x32"]["tok_s"] / results["base_x1"]["tok_s"]
    mixed_vs_single = results["mixed_x32"]["tok_s"] / results["single_x32"]["tok_s"]
    bound_share = results["base_x32"]["tok_s"] / bound
    bound_share_all = results["base_x32"]["all_tok_s"] / bound
    goals = {"x32_vs_x1>=10": x32_vs_x1 >= 10, "mixed_vs_single>=0.85": mixed_vs_single >= 0.85,
             "bound_share>=0.5": bound_share >= 0.5}  # fmt: skip
    print(f"32 vs 1 stream {x32_vs_x1:.1f}x, mixed vs single adapter {mixed_vs_single:.2f}x, bound share "
          f"{bound_share:.0%} ({bound_share_all:.0%} counting prompt tokens); goals {goals}", flush=True)  # fmt: skip
    print(json.dumps({
        "x32_vs_x1": round(x32_vs_x1, 2),
        "mixed_vs_single": round(mixed_vs_single, 3),
        "bound_share": round(bound_share, 3),
        "bound_share_with_prefill": round(bound_share_all, 3),
        "dtype": name,
        "fused_kernels": fused,
        "goals": goals,
        "bound_gflops": round(gflops, 1),
        "bound_gflops_plain": round(plain_gflops, 1),
        "bound_gflops_packed": round(packed_gflops, 1),
        "packed_weights": packed,
        "bound_tok_s": round(bound, 1),
        "params": params,
        "threads": threads,
        "model": a.model,
        "tokens_per_request": a.tokens,
        "rounds": a.rounds,
        "sampling": a.sampling,
        "steps": steps,
        **{f"{label}_{key}": value for label, r in results.items() for key, value in r.items()
           if key in ("tok_s", "all_tok_s", "ttft_p50_ms", "ttft_p99_ms")},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
