"""Benchmark: LoRA SFT throughput of tuneforge's SFT recipe against TRL's SFTTrainer, same run, same data and model.

SmolLM2-135M-Instruct (the catalog's GGUF entry, converted once into --cache), LoRA r=8 / alpha 16 on all linear
layers, sequence length 512, generated conversations of varied length. Our side is the real recipe
(`tuneforge.train.recipes.sft.run`) with its defaults (packing, `batch_size="max"`, prompts masked), stopped through
its stop flag after the warm-up step plus --steps timed steps; it reports the non-padding tokens per second of
each step. The baseline is `SFTTrainer` with its defaults (batch 8, gradient checkpointing, padding to the longest
row, every token trained), except `bf16=False` where this machine cannot run bf16 fast (TRL's default `bf16=True`
refuses to start on a CPU without bf16 support). Both figures are non-padding tokens per second of a training step,
the median over the timed steps (the warm-up step excluded). The two trainers take turns in one process, one step
each (ours in a thread, paused between its steps), so a busy neighbour slows both alike; `paired_ratio_median` is
the median of the step-by-step ratios.

The fp32 and bf16 matmul peaks are measured in the same run (best of several 2048^3 / 512^3 multiplications).
MFU is against the peak of the dtype the run actually computed in (fp32 here unless bf16 is fast), with model
FLOPs per token = 4 x body params (forward plus activation gradients; frozen weights get no weight gradient)
+ 6 x LoRA params + 4 x head params at trained positions (ours computes logits only there) + causal attention
(3 x 2 x 2 x layers x hidden x context, per example). Activation recomputation is not counted.

    python bench/train_throughput.py [--steps 5] [--seq 512] [--examples 96] [--cache DIR] [--no-baseline]

Timings drift up to 3x on a shared machine: compare the two figures of one run, not figures across runs. The
`cpu_*` figures divide by this process's CPU time per thread instead of wall time, which neighbours disturb less.
The last line printed is one JSON object (tok_s, peak_gflops, mfu, baseline_tok_s, ratio, dtype, peaks, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from tuneforge.catalog.entries import SMOLLM2
from tuneforge.catalog.loading import resolve_model_dir
from tuneforge.storage import open_blob_store
from tuneforge.train.events import EventWriter
from tuneforge.train.hardware import bf16_is_fast, set_threads
from tuneforge.train.spec import Hyper, ModelSource, TrainSpec

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


def matmul_peak(dtype: torch.dtype, n: int, seconds: float) -> float:
    """Best GFLOP/s of n^3 matmuls over about `seconds`."""
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


class Turns:
    """Strict alternation, one training step each: ours, then TRL's, then ours... Neighbours on a shared machine
    then slow both sides alike, and each pair of steps is a fair comparison."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._ours, self._trl = threading.Semaphore(0), threading.Semaphore(0)
        self.first_step = threading.Event()

    def ours_done(self) -> None:
        if self.enabled:
            self._ours.release()
            if not self._trl.acquire(timeout=TURN_TIMEOUT_S):
                raise RuntimeError("the baseline's step did not finish")

    def trl_may_start(self) -> None:
        if not self._ours.acquire(timeout=TURN_TIMEOUT_S):
            raise RuntimeError("our step did not finish")

    def trl_done(self) -> None:
        self._trl.release()


TURN_TIMEOUT_S = 1800


class BenchEvents(EventWriter):
    """The recipe's event stream, also kept in memory: step rates, and the turn taking after each step."""

    def __init__(self, path: str, stop: threading.Event, stop_after: int, turns: Turns) -> None:
        super().__init__(path)
        self.stop, self.stop_after, self.turns = stop, stop_after, turns
        self.rates: list[float] = []
        self.cpu_rates: list[float] = []
        self.events: dict[str, dict[str, Any]] = {}
        self.clock = (time.perf_counter(), time.process_time())
        self.peak_rss_gb = 0.0

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
        if step == 1:  # our first step ran alone: its peak is ours only
            self.peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            self.turns.first_step.set()
        if step >= self.stop_after:
            self.stop.set()
        self.turns.ours_done()
        self.clock = (time.perf_counter(), time.process_time())


def run_ours(
    model: ModelSource, cache: str, rows: list[dict[str, Any]], seq: int, steps: int, tmp: Path, turns: Turns
) -> dict[str, Any]:
    from tuneforge.train.recipes.sft import run

    blobs = open_blob_store(str(tmp / "blobs"))
    with blobs.writer("files/bench") as w:
        w.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    spec = TrainSpec(
        job_id="ft-bench", model=model, storage_url=str(tmp / "blobs"), cache_dir=cache, work_dir=str(tmp / "work"),
        events_path=str(tmp / "work" / "events.jsonl"), training_file_key="files/bench", output_prefix="jobs/ft-bench",
        output_name="bench/smollm2", hyper=Hyper(max_seq_length=seq, learning_rate=1e-4, n_epochs=1),
    )  # fmt: skip
    stop = threading.Event()
    out = BenchEvents(spec.events_path, stop, stop_after=1 + steps, turns=turns)
    try:
        outcome = run(spec, out, stop)
    finally:
        turns.first_step.set()
        out.close()
    start = out.events["training_start"]
    data = out.events["training_data_download_complete"]
    return {
        "rates": out.rates,
        "cpu_rates": out.cpu_rates,
        "examples_per_step": start["batch_size"],
        "trainable": start["trainable_params"],
        "trained_share": data["trained_tokens"] / max(1, data["token_count"]),
        "peak_rss_gb": out.peak_rss_gb,
        "outcome": outcome.status,
    }


def run_trl(
    model_dir: Path, rows: list[dict[str, Any]], seq: int, steps: int, tmp: Path, bf16: bool, turns: Turns
) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

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

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTConfig(output_dir=str(tmp / "trl"), bf16=bf16, max_length=seq, max_steps=1 + steps,
                       report_to="none", save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[Timer()])  # fmt: skip
    collate = trainer.data_collator

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    try:
        trainer.train()
    finally:
        turns.trl_done()  # never leave our side waiting
    return {
        "rates": [n / t for n, t in zip(tokens, times, strict=False)],
        "cpu_rates": [n / t for n, t in zip(tokens, cpu_times, strict=False)],
        "batch_size": config.per_device_train_batch_size,
        "gradient_checkpointing": config.gradient_checkpointing,
        "lengths": [len(x) for x in trainer.train_dataset["input_ids"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step, each side")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "tuneforge" / "models"))
    ap.add_argument("--no-baseline", action="store_true")
    a = ap.parse_args()

    threads = set_threads(None)
    use_bf16 = bf16_is_fast(torch.device("cpu"))
    print(f"threads {threads}, cpu {torch.backends.cpu.get_cpu_capability()}, bf16 fast: {use_bf16}", flush=True)
    peak32 = matmul_peak(torch.float32, 2048, 4.0)
    peak16 = matmul_peak(torch.bfloat16, 512, 2.0)
    print(f"matmul peaks: fp32 {peak32:.1f} GFLOP/s, bf16 {peak16:.2f} GFLOP/s", flush=True)

    source = ModelSource(name=SMOLLM2.name, source_kind=SMOLLM2.source_kind, source=SMOLLM2.source)
    t = time.perf_counter()
    model_dir = resolve_model_dir(source, a.cache)
    print(f"model folder {model_dir} ({time.perf_counter() - t:.1f}s)", flush=True)
    rows = conversations(a.examples)
    turns = Turns(enabled=not a.no_baseline)
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:

        def ours_thread() -> None:
            try:
                found["ours"] = run_ours(source, a.cache, rows, a.seq, a.steps, Path(tmp), turns)
            except BaseException as exc:
                found["error"] = exc

        worker = threading.Thread(target=ours_thread, name="ours")
        worker.start()
        turns.first_step.wait()
        base = None
        if not a.no_baseline and "error" not in found:
            base = run_trl(model_dir, rows, a.seq, a.steps, Path(tmp), use_bf16, turns)
        worker.join()
    if "error" in found:
        raise found["error"]
    ours = found["ours"]

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    lengths = base["lengths"] if base else [a.seq] * 8
    dtype = "bf16" if use_bf16 else "fp32"
    peak = peak16 if use_bf16 else peak32
    timed = slice(1, 1 + a.steps)
    tok_s = statistics.median(ours["rates"][timed])
    cpu_tok_s = statistics.median(ours["cpu_rates"][timed])
    base_tok_s = statistics.median(base["rates"][timed]) if base else None
    base_cpu_tok_s = statistics.median(base["cpu_rates"][timed]) if base else None
    pairs = [o / b for o, b in zip(ours["rates"][timed], base["rates"][timed], strict=False)] if base else []
    ours_flops = flops_per_token(config, lengths, ours["trained_share"], ours["trainable"])
    base_flops = flops_per_token(config, lengths, 1.0, ours["trainable"])  # TRL trains every token
    result = {
        "tok_s": round(tok_s, 2),
        "peak_gflops": round(peak, 2),
        "mfu": round(tok_s * ours_flops / 1e9 / peak, 4),
        "baseline_tok_s": round(base_tok_s, 2) if base_tok_s else None,
        "ratio": round(tok_s / base_tok_s, 3) if base_tok_s else None,
        "dtype": dtype,
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
        "trained_share": round(ours["trained_share"], 3),
        "examples_per_step": ours["examples_per_step"],
        "baseline_batch_size": base["batch_size"] if base else None,
        "baseline_gradient_checkpointing": base["gradient_checkpointing"] if base else None,
        "ours_per_step_tok_s": [round(r, 1) for r in ours["rates"]],
        "baseline_per_step_tok_s": [round(r, 1) for r in base["rates"]] if base else None,
        "peak_rss_gb_ours": round(ours["peak_rss_gb"], 2),
        "seq_len": a.seq,
        "steps_timed": a.steps,
        "threads": threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
