"""Benchmark: LoRA SFT and DPO throughput of tuneforge's recipes against TRL's SFTTrainer and DPOTrainer, same run,
same data and model.

SmolLM2-135M-Instruct (the catalog's GGUF entry, converted once into --cache), LoRA r=8 / alpha 16 on all linear
layers, sequence length 512, generated conversations of varied length. Our side is the real recipe
(`tuneforge.train.recipes.sft.run`) with its defaults (packing, `batch_size="max"`, prompts masked), stopped through
its stop flag after the warm-up step plus --steps timed steps; it reports the non-padding tokens per second of
each step. The baseline is `SFTTrainer` with its defaults (batch 8, gradient checkpointing, padding to the longest
row, every token trained), except `use_cpu=True` (both sides train on the CPU; without it transformers refuses bf16
on a machine without a bf16 GPU) and `bf16` set to the dtype our side computes in. Both figures are non-padding
tokens per second of a training step, the median over the timed steps (the warm-up step excluded). The two trainers
take turns in one process, one step each (each in its own thread, paused between its steps), so a busy neighbour
slows both alike; `paired_ratio_median` is the median of the step-by-step ratios.

--dtype means what TUNEFORGE_TRAIN_DTYPE means: `auto` computes in bf16 autocast (over fp32 weights) where bf16 is
fast (a CPU with AVX512-BF16 or AMX), else in fp32; `fp32` and `bf16` force it, on both sides (bf16 where it is
emulated is 10-100x slower: use it with few steps, or --model tiny). A failure on either side ends the bench at once:
the failing side's traceback on stderr, a last line {"error": ..., "side": ...} and exit status 1; the other side is
not waited for.

The fp32 and bf16 matmul peaks are measured in the same run (best of several n^3 multiplications, n up to 2048,
smaller where bf16 is emulated). MFU is against the peak of the dtype the run actually computed in, with model
FLOPs per token = 4 x body params (forward plus activation gradients; frozen weights get no weight gradient)
+ 6 x LoRA params + 4 x head params at trained positions (ours computes logits only there) + causal attention
(3 x 2 x 2 x layers x hidden x context, per example). Activation recomputation is not counted.

    python bench/train_throughput.py [--steps 5] [--dtype auto|fp32|bf16] [--seq 512] [--examples 96]
                                     [--cache DIR] [--no-baseline] [--model smollm2|tiny] [--peak-seconds 3]
                                     [--no-dpo]

`--model tiny` is a random ~100k-parameter llama (tests, and bf16 runs where bf16 is emulated); its figures say
nothing about real throughput. Timings drift up to 3x on a shared machine: compare the two figures of one run, not
figures across runs. The `cpu_*` figures divide by this process's CPU time per thread instead of wall time, which
neighbours disturb less. The last line printed is one JSON object (tok_s, baseline_tok_s, ratio, dtype,
peak_gflops (of that dtype), peak_gflops_fp32, peak_gflops_bf16, mfu, ..., dpo_tok_s, dpo_baseline_tok_s,
dpo_ratio, dpo_reference_seconds, dpo_epoch_ratio).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from tuneforge.catalog.entries import SMOLLM2
from tuneforge.catalog.loading import resolve_model_dir
from tuneforge.storage import open_blob_store
from tuneforge.train.events import EventWriter
from tuneforge.train.hardware import bf16_is_fast, compute_dtype, set_threads
from tuneforge.train.spec import Hyper, ModelSource, TrainSpec, standalone_plan

_VOCABULARY = (
    "the of and to in is that for it as was with be by on not this are or from at which but have an they you were "
    "there been one all we their has would when if what so no who more about up out them time into only some could "
    "new than then its also two like other people may first over years model data train loss token batch layer "
    "weight value query answer question example because should might please thanks sure river mountain city music "
    "history science garden kitchen window winter summer market energy planet ocean forest language number"
)
WORDS = _VOCABULARY.split()


def conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Varied conversations: a question of 8-60 words, an answer of 20-320 words (about 40-500 tokens in all)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        words = [rng.choice(WORDS) for _ in range(k)]
        return " ".join(words).capitalize() + "."

    return [
        {
            "messages": [
                {"role": "user", "content": text(rng.randint(8, 60)) + "?"},
                {"role": "assistant", "content": text(rng.randint(20, 320))},
            ]
        }
        for _ in range(n)
    ]


def preference_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`conversations` as preference pairs (api-contract `preference_openai`): each question with its own answer
    preferred to the next conversation's answer."""
    convs = conversations(n, seed)
    return [
        {
            "input": {"messages": c["messages"][:-1]},
            "preferred_output": [c["messages"][-1]],
            "non_preferred_output": [convs[(i + 1) % n]["messages"][-1]],
        }
        for i, c in enumerate(convs)
    ]


def matmul_peak(dtype: torch.dtype, seconds: float) -> float:
    """Best GFLOP/s of n^3 matmuls over about `seconds`; n grows from 256 to 2048 while one matmul of the next size
    would take under an eighth of the time (so emulated bf16 stays at a small n and a short measurement)."""
    n = 256
    while n < 2048:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)
        took = math.inf
        for _ in range(3):
            t = time.perf_counter()
            torch.matmul(a, b)
            took = min(took, time.perf_counter() - t)
        if 8 * took > seconds / 8:
            break
        n *= 2
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def flops_per_token(config: Any, lengths: list[int], trained_share: float, lora_params: int) -> float:
    """Model FLOPs per non-padding token of a LoRA step (see the module docstring)."""
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head = vocab * hidden
    body = config_params(config) - head  # tied: the embedding lookup is free, its matmul is the head
    tokens = sum(lengths)
    attention = sum(3 * 2 * 2 * layers * hidden * n * (n + 1) / 2 for n in lengths) / max(1, tokens)
    return 4 * body + 6 * lora_params + 4 * head * trained_share + attention


def config_params(config: Any) -> int:
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


class OtherSideFailed(RuntimeError):
    """Raised in a side waiting for its turn when the other side has failed (the bench reports that one's error)."""


class Turns:
    """Strict alternation, one training step each: ours, then TRL's, then ours... Neighbours on a shared machine
    then slow both sides alike, and each pair of steps is a fair comparison.

    Also the bench's one error slot: the first failure of either side is kept, and every wait for a turn ends at once
    with OtherSideFailed. A wait also ends when the other side is over (it takes no more turns), and after
    TURN_TIMEOUT_S in any case, so no side is ever left waiting."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._ours, self._trl = threading.Semaphore(0), threading.Semaphore(0)
        self.first_step = threading.Event()
        self.ours_over, self.trl_over = threading.Event(), threading.Event()
        self.failed = threading.Event()
        self.error: tuple[str, BaseException] | None = None
        self._lock = threading.Lock()

    def fail(self, side: str, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = (side, exc)
        self.failed.set()

    def _wait(self, ready: Callable[[float], bool], other_over: threading.Event, what: str) -> None:
        end = time.monotonic() + TURN_TIMEOUT_S
        while not ready(POLL_S):
            if self.failed.is_set():
                raise OtherSideFailed(f"stopped waiting for {what}: the other side failed")
            if other_over.is_set():
                return
            if time.monotonic() > end:
                raise TimeoutError(f"{what} did not finish within {TURN_TIMEOUT_S} s")

    def ours_done(self) -> None:
        if self.enabled:
            self._ours.release()
            self._wait(lambda t: self._trl.acquire(timeout=t), self.trl_over, "the baseline's step")

    def trl_may_start(self) -> None:
        self._wait(lambda t: self._ours.acquire(timeout=t), self.ours_over, "our step")

    def wait_first_step(self) -> None:
        self._wait(self.first_step.wait, self.ours_over, "our first step")

    def trl_done(self) -> None:
        self._trl.release()


TURN_TIMEOUT_S = 1800
POLL_S = 0.1


class BenchEvents(EventWriter):
    """The recipe's event stream, also kept in memory: step rates, and the turn taking after each step."""

    def __init__(self, path: str, stop: threading.Event, stop_after: int, turns: Turns, fail_at: int = 0) -> None:
        super().__init__(path)
        self.stop, self.stop_after, self.turns, self.fail_at = stop, stop_after, turns, fail_at
        self.rates: list[float] = []
        self.cpu_rates: list[float] = []
        self.events: dict[str, dict[str, Any]] = {}
        self.clock = (time.perf_counter(), time.process_time())
        self.peak_rss_gb = 0.0
        self.last_step = 0

    def event(self, type_: str, message: str, *, level: str = "info", **data: Any) -> None:
        super().event(type_, message, level=level, **data)
        self.events[type_] = {"message": message, **data}
        print(f"  [ours] {type_}: {message}", flush=True)

    def metric(self, step: int, **values: float) -> None:
        super().metric(step, **values)
        if "train/tokens_per_second" in values:
            # A step's tokens are its rate times its time (the time since the previous step's metric or turn).
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = values["train/tokens_per_second"] * (wall - self.clock[0])
            self.cpu_rates.append(tokens / max(1e-9, (cpu - self.clock[1]) / torch.get_num_threads()))
            self.rates.append(values["train/tokens_per_second"])
            print(f"  [ours] step {step}: {values['train/tokens_per_second']:.1f} tok/s, "
                  f"loss {values['train/loss']:.3f}", flush=True)  # fmt: skip

    def progress(self, step: int, total_steps: int, **extra: Any) -> None:
        super().progress(step, total_steps, **extra)
        if step <= self.last_step:  # a heartbeat during a long pass (DPO's reference), not a step
            return
        self.last_step = step
        if step == 1:  # our first step ran alone: its peak is ours only
            self.peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            self.turns.first_step.set()
        if step == self.fail_at:
            raise RuntimeError(f"injected failure of our side at step {step} (--fail-ours)")
        if step >= self.stop_after:
            self.stop.set()
        self.turns.ours_done()
        self.clock = (time.perf_counter(), time.process_time())


def run_ours(
    model: ModelSource, cache: str, rows: list[dict[str, Any]], seq: int, steps: int, tmp: Path, turns: Turns,
    dtype: str, fail_at: int, method: str = "sft",
) -> dict[str, Any]:  # fmt: skip
    from tuneforge.train.registry import load_recipe

    run = load_recipe(method)
    work = tmp / f"ours-{method}"
    blobs = open_blob_store(str(work / "blobs"))
    with blobs.writer("files/bench") as w:
        w.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    plan = standalone_plan(model, Hyper(max_seq_length=seq, learning_rate=1e-4, n_epochs=1), method=method)  # type: ignore[arg-type]
    spec = TrainSpec(
        job_id="ft-bench", plan=plan, storage_url=str(work / "blobs"), cache_dir=cache, work_dir=str(work / "work"),
        events_path=str(work / "work" / "events.jsonl"), training_file_key="files/bench", output_prefix="jobs/ft-bench",
        output_name="bench/smollm2", dtype=dtype,
    )  # fmt: skip
    stop = threading.Event()
    out = BenchEvents(spec.events_path, stop, stop_after=1 + steps, turns=turns, fail_at=fail_at)
    try:
        outcome = run(spec, out, stop)
    finally:
        out.close()
    start = out.events["training_start"]
    data = out.events["training_data_download_complete"]
    return {
        "rates": out.rates,
        "cpu_rates": out.cpu_rates,
        "examples_per_step": start["batch_size"],
        "trainable": start["trainable_params"],
        "trained_share": data["trained_tokens"] / max(1, data["token_count"]),
        "token_count": data["token_count"],
        "reference_seconds": start.get("reference_seconds"),
        "peak_rss_gb": out.peak_rss_gb,
        "outcome": outcome.status,
        "dtype": start.get("dtype"),
    }


def run_trl(
    model_dir: Path, rows: list[dict[str, Any]], seq: int, steps: int, tmp: Path, bf16: bool, turns: Turns,
    fail: bool, method: str = "sft",
) -> dict[str, Any]:  # fmt: skip
    """TRL's trainer with its defaults: `SFTTrainer` on conversations, `DPOTrainer` on preference pairs (its
    conversational format: prompt, chosen, rejected; the reference is the base with the adapter disabled)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tokens: list[int] = []
    times: list[float] = []
    cpu_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            turns.trl_may_start()
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t)
            cpu_times.append((time.process_time() - self.c) / torch.get_num_threads())
            print(f"  [trl] step {state.global_step}: {tokens[len(times) - 1] / times[-1]:.1f} tok/s", flush=True)
            turns.trl_done()

    turns.wait_first_step()  # our first step runs alone: its peak memory is ours only
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if fail:  # where TRL refused bf16 on a CPU before use_cpu was set
        raise RuntimeError("injected failure of the baseline before its first step (--fail-baseline)")
    # use_cpu: both sides train on the CPU, and transformers allows bf16 (autocast over fp32 weights) there only then.
    common = {"output_dir": str(tmp / f"trl-{method}"), "use_cpu": True, "bf16": bf16, "fp16": False,
              "max_length": seq, "max_steps": 1 + steps, "report_to": "none", "save_strategy": "no",
              "disable_tqdm": True}  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer: Any
    if method == "dpo":
        config: Any = DPOConfig(**common)
        pairs = [{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                  "rejected": r["non_preferred_output"]} for r in rows]  # fmt: skip
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                             processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])  # fmt: skip
    else:
        config = SFTConfig(**common)
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])  # fmt: skip
    collate = trainer.data_collator

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    return {
        "rates": [n / t for n, t in zip(tokens, times, strict=False)],
        "cpu_rates": [n / t for n, t in zip(tokens, cpu_times, strict=False)],
        "batch_size": config.per_device_train_batch_size,
        "gradient_checkpointing": config.gradient_checkpointing,
        "mixed_precision": trainer.accelerator.mixed_precision,  # what accelerate's autocast really uses
        "lengths": [len(x) for x in trainer.train_dataset["input_ids"]] if method == "sft" else [],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step, each side")
    ap.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="compute dtype of both sides, as TUNEFORGE_TRAIN_DTYPE: auto = bf16 where it is fast",
    )
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "tuneforge" / "models"))
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument(
        "--model",
        choices=("smollm2", "tiny"),
        default="smollm2",
        help="tiny: a random ~100k-parameter llama (tests; its figures say nothing about throughput)",
    )
    ap.add_argument("--peak-seconds", type=float, default=3.0, help="time spent measuring each matmul peak")
    ap.add_argument("--no-dpo", action="store_true", help="the SFT comparison only")
    ap.add_argument("--fail-baseline", action="store_true", help=argparse.SUPPRESS)  # tests: the baseline raises
    ap.add_argument("--fail-ours", action="store_true", help=argparse.SUPPRESS)  # tests: ours raises at step 2
    a = ap.parse_args()

    threads = set_threads(None)
    fast = bf16_is_fast(torch.device("cpu"))
    use_bf16 = compute_dtype(a.dtype, torch.device("cpu")) == torch.bfloat16
    dtype = "bf16" if use_bf16 else "fp32"
    print(f"threads {threads}, cpu {torch.backends.cpu.get_cpu_capability()}, bf16 fast: {fast}, dtype {dtype} "
          f"(--dtype {a.dtype})", flush=True)  # fmt: skip
    peak32 = matmul_peak(torch.float32, a.peak_seconds)
    peak16 = matmul_peak(torch.bfloat16, a.peak_seconds)
    print(f"matmul peaks: fp32 {peak32:.1f} GFLOP/s, bf16 {peak16:.2f} GFLOP/s", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    if a.model == "tiny":
        from tuneforge.train.tiny_models import save_tiny_model

        folder = save_tiny_model(tmp / "tiny-llama", "llama", hidden=128)
        source = ModelSource(name="tiny-llama", source_kind="local", source=str(folder))
    else:
        source = ModelSource(name=SMOLLM2.name, source_kind=SMOLLM2.source_kind, source=SMOLLM2.source)
    t = time.perf_counter()
    model_dir = resolve_model_dir(source, a.cache)
    print(f"model folder {model_dir} ({time.perf_counter() - t:.1f}s)", flush=True)
    rows = conversations(a.examples)
    fail_at = 2 if a.fail_ours else 0
    found = compare(
        functools.partial(run_ours, source, a.cache, rows, a.seq, a.steps, tmp, dtype=dtype, fail_at=fail_at),
        None if a.no_baseline else functools.partial(run_trl, model_dir, rows, a.seq, a.steps, tmp, use_bf16,
                                                     fail=a.fail_baseline),
        tmp,
    )  # fmt: skip
    dpo_found: dict[str, Any] = {}
    if not a.no_dpo:
        pairs = preference_pairs(a.examples)
        dpo_found = compare(
            functools.partial(run_ours, source, a.cache, pairs, a.seq, a.steps, tmp, dtype=dtype, fail_at=0,
                              method="dpo"),
            None if a.no_baseline else functools.partial(run_trl, model_dir, pairs, a.seq, a.steps, tmp, use_bf16,
                                                         fail=False, method="dpo"),
            tmp,
        )  # fmt: skip
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    mine, base = found["ours"], found.get("baseline")
    lengths = base["lengths"] if base else [a.seq] * 8
    peak = peak16 if use_bf16 else peak32
    timed = slice(1, 1 + a.steps)
    tok_s = statistics.median(mine["rates"][timed])
    cpu_tok_s = statistics.median(mine["cpu_rates"][timed])
    base_tok_s = statistics.median(base["rates"][timed]) if base else None
    base_cpu_tok_s = statistics.median(base["cpu_rates"][timed]) if base else None
    pairs = [o / b for o, b in zip(mine["rates"][timed], base["rates"][timed], strict=False)] if base else []
    ours_flops = flops_per_token(config, lengths, mine["trained_share"], mine["trainable"])
    base_flops = flops_per_token(config, lengths, 1.0, mine["trainable"])  # TRL trains every token
    result = {
        "tok_s": round(tok_s, 2),
        "peak_gflops": round(peak, 2),
        "mfu": round(tok_s * ours_flops / 1e9 / peak, 4),
        "baseline_tok_s": round(base_tok_s, 2) if base_tok_s else None,
        "ratio": round(tok_s / base_tok_s, 3) if base_tok_s else None,
        "dtype": dtype,
        "dtype_requested": a.dtype,
        "bf16_fast": fast,
        "ours_dtype": mine["dtype"],
        "baseline_mixed_precision": base["mixed_precision"] if base else None,
        "model": source.name,
        "mfu_basis": f"{dtype} matmul peak measured in this run",
        "peak_gflops_fp32": round(peak32, 2),
        "peak_gflops_bf16": round(peak16, 2),
        "paired_ratio_median": round(statistics.median(pairs), 3) if pairs else None,
        "cpu_tok_s": round(cpu_tok_s, 2),
        "baseline_cpu_tok_s": round(base_cpu_tok_s, 2) if base_cpu_tok_s else None,
        "cpu_ratio": round(cpu_tok_s / base_cpu_tok_s, 3) if base_cpu_tok_s else None,
        "baseline_mfu": round(base_tok_s * base_flops / 1e9 / peak, 4) if base_tok_s else None,
        "mflops_per_token": round(ours_flops / 1e6, 1),
        "baseline_mflops_per_token": round(base_flops / 1e6, 1),
        "trained_share": round(mine["trained_share"], 3),
        "examples_per_step": mine["examples_per_step"],
        "baseline_batch_size": base["batch_size"] if base else None,
        "baseline_gradient_checkpointing": base["gradient_checkpointing"] if base else None,
        "ours_per_step_tok_s": [round(r, 1) for r in mine["rates"]],
        "baseline_per_step_tok_s": [round(r, 1) for r in base["rates"]] if base else None,
        "peak_rss_gb_ours": round(mine["peak_rss_gb"], 2),
        "seq_len": a.seq,
        "steps_timed": a.steps,
        "threads": threads,
    }
    if dpo_found:
        result.update(dpo_figures(dpo_found, timed))
    print(json.dumps(result))


def dpo_figures(found: dict[str, dict[str, Any]], timed: slice) -> dict[str, Any]:
    """The DPO comparison's figures: step tokens/s of each side (a pair's prompt counted with each completion, as
    both sides forward it), their ratio, and what our precomputed reference costs: `dpo_reference_seconds` once
    per run, and `dpo_epoch_ratio`, one epoch of this data at each side's median step rate with that cost added
    to ours (TRL's default computes the reference inside every step instead)."""
    mine, base = found["ours"], found.get("baseline")
    tok_s = statistics.median(mine["rates"][timed])
    out: dict[str, Any] = {
        "dpo_tok_s": round(tok_s, 2),
        "dpo_examples_per_step": mine["examples_per_step"],
        "dpo_reference_seconds": round(mine["reference_seconds"] or 0.0, 2),
        "dpo_per_step_tok_s": [round(r, 1) for r in mine["rates"]],
        "dpo_baseline_tok_s": None,
        "dpo_ratio": None,
    }
    if base:
        base_tok_s = statistics.median(base["rates"][timed])
        pairs = [o / b for o, b in zip(mine["rates"][timed], base["rates"][timed], strict=False)]
        tokens = mine["token_count"]
        ours_epoch = (mine["reference_seconds"] or 0.0) + tokens / tok_s
        out.update(
            dpo_baseline_tok_s=round(base_tok_s, 2),
            dpo_ratio=round(tok_s / base_tok_s, 3),
            dpo_paired_ratio_median=round(statistics.median(pairs), 3),
            dpo_epoch_ratio=round((tokens / base_tok_s) / ours_epoch, 3),
            dpo_baseline_batch_size=base["batch_size"],
            dpo_baseline_gradient_checkpointing=base["gradient_checkpointing"],
            dpo_baseline_per_step_tok_s=[round(r, 1) for r in base["rates"]],
        )
    return out


def compare(
    ours: Callable[..., dict[str, Any]], trl: Callable[..., dict[str, Any]] | None, tmp: Path
) -> dict[str, dict[str, Any]]:
    """Our recipe and (unless None) TRL's trainer, taking turns one step each (`Turns`), each in its own thread;
    {"ours": ..., "baseline": ...}. A failure on either side ends the bench at once (`abort`)."""
    turns = Turns(enabled=trl is not None)
    found: dict[str, Any] = {}

    def side(name: str, over: threading.Event, work: Callable[[], dict[str, Any]]) -> None:
        try:
            found[name] = work()
        except BaseException as exc:
            turns.fail(name, exc)
        finally:
            over.set()  # the other side takes its remaining steps without waiting for this one

    work = functools.partial(ours, turns=turns)
    sides = [threading.Thread(target=side, args=("ours", turns.ours_over, work), name="ours", daemon=True)]
    if trl is not None:
        base = functools.partial(trl, turns=turns)
        sides.append(threading.Thread(target=side, args=("baseline", turns.trl_over, base), name="trl", daemon=True))
    for thread in sides:
        thread.start()
    for thread in sides:  # daemon threads: after a failure nothing waits for them, whatever they are doing
        while thread.is_alive() and not turns.failed.is_set():
            thread.join(POLL_S)
        if turns.failed.is_set():
            abort(turns, tmp)
    return found


def abort(turns: Turns, tmp: Path) -> None:
    """End the bench now with the failing side's error: its traceback on stderr, a last JSON line, exit status 1.
    os._exit: the other side's thread may be inside a step; nothing waits for it, nor runs after it."""
    assert turns.error is not None
    side, exc = turns.error
    traceback.print_exception(exc)
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "side": side}), flush=True)
    sys.stderr.flush()
    shutil.rmtree(tmp, ignore_errors=True)
    os._exit(1)


if __name__ == "__main__":
    main()
