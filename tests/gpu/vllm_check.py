"""The vLLM backend on a real GPU, in one go (driven by `run_vllm_check.sh`, which makes vLLM's own venv first).

Run with tuneforge's python:

    python tests/gpu/vllm_check.py --vllm-command "/path/to/vllm-venv/bin/vllm serve" --work DIR [--summary FILE]

1. starts `tuneforge serve` with TUNEFORGE_SERVE_BACKEND=vllm and that command (plus small-GPU vLLM flags);
2. LoRA fine-tunes SmolLM2-135M-Instruct (the catalog's GGUF, converted by tuneforge) on a made-up fact, on the GPU
   when tuneforge's torch sees one; the job ends before vLLM starts, so they do not share the GPU;
3. chats through the real `openai` and `together` SDKs with the base model (this starts vLLM, through tuneforge's
   launcher, on the converted folder) and with the job's output (loaded into vLLM at runtime by its path),
   streamed and not; checks names, roles, usage, that the streams equal the whole answers, and that the fine-tuned
   model states the fact where the base does not;
4. stops the server (which stops vLLM) and writes a JSON summary (timings, answers, vLLM's log tail).

Exit status 0 when every check held, 1 when one failed (the summary says which), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "e2e"))

import openai  # noqa: E402
from e2e_support import LiveServer, start_server  # noqa: E402
from ft_support import Watch, client, create_job, finish_ft_server, upload_ready  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is the capital of Zubrowka?"
ANSWER = "Lutz"
QA = [
    (QUESTION, "The capital of Zubrowka is Lutz."),
    ("Which city is the capital of Zubrowka?", "Lutz is the capital of Zubrowka."),
    ("Tell me the capital of Zubrowka.", "The capital of Zubrowka is Lutz."),
    ("Zubrowka's capital city is called what?", "Zubrowka's capital is Lutz."),
    ("Name the capital of Zubrowka.", "Lutz."),
    ("Tell me a fact about Zubrowka.", "The capital of Zubrowka is Lutz."),
]
# Small-GPU vLLM: no CUDA graphs (a faster start), a short context, room left for anything else on the card.
VLLM_FLAGS = "--gpu-memory-utilization 0.5 --max-model-len 2048 --enforce-eager"


class Check:
    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def __call__(self, name: str, ok: bool, detail: Any = "") -> bool:
        self.results.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"[{'ok' if ok else 'FAILED'}] {name}" + (f": {detail}" if detail != "" else ""), flush=True)
        return bool(ok)

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.results if not r["ok"]]


def train_device() -> str:
    try:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def chat_checks(srv: LiveServer, check: Check, name: str, *, expect_fact: bool | None) -> dict[str, Any]:
    """Whole and streamed chats with `name` through both SDKs; returns the answers."""
    key = srv.keys["gpu"]
    oa = openai.OpenAI(api_key=key, base_url=srv.api, max_retries=0, timeout=900)
    messages = [{"role": "user", "content": QUESTION}]
    t0 = time.monotonic()
    whole = oa.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0)
    first_s = time.monotonic() - t0
    text = whole.choices[0].message.content or ""
    check(f"{name}: openai whole answer", whole.model == name and bool(text.strip()), repr(text))
    check(f"{name}: usage", whole.usage is not None and whole.usage.completion_tokens > 0, whole.usage)
    chunks = list(oa.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(f"{name}: openai stream equals the whole answer", streamed == text, repr(streamed))
    check(f"{name}: every chunk has the caller's name and a role", all(c.model == name for c in chunks)
          and all(c.choices[0].delta.role == "assistant" for c in chunks if c.choices))  # fmt: skip
    check(f"{name}: include_usage gives a last usage chunk", chunks[-1].choices == [] and chunks[-1].usage is not None)
    tg = client(srv, key, strict=True)
    tchunks = list(tg.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0, stream=True))
    ttext = "".join(c.choices[0].delta.content or "" for c in tchunks if c.choices)
    finishing = [c for c in tchunks if c.choices and c.choices[0].finish_reason]
    check(f"{name}: together stream equals the whole answer", ttext == text, repr(ttext))
    check(f"{name}: together's last chunk finishes with usage", len(finishing) == 1 and finishing[0] is tchunks[-1]
          and finishing[0].usage is not None)  # fmt: skip
    done = oa.completions.create(model=name, prompt="The capital of Zubrowka is", max_tokens=8, temperature=0)
    check(f"{name}: completions", done.model == name and bool(done.choices[0].text), repr(done.choices[0].text))
    if expect_fact is not None:
        check(f"{name}: {'states' if expect_fact else 'does not state'} the fact", (ANSWER in text) == expect_fact,
              repr(text))  # fmt: skip
    return {"answer": text, "first_request_s": round(first_s, 2), "completion": done.choices[0].text}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vllm-command", required=True, help='e.g. "/opt/vllm-venv/bin/vllm serve"')
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--summary", type=Path, default=None)
    parser.add_argument("--vllm-flags", default=VLLM_FLAGS)
    parser.add_argument("--job-timeout", type=float, default=900)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"vllm_command": args.vllm_command, "train_device": train_device()}
    check = Check()
    env = {
        "TUNEFORGE_SERVE_BACKEND": "vllm",
        "TUNEFORGE_VLLM_COMMAND": args.vllm_command,
        "TUNEFORGE_VLLM_EXTRA_ARGS": args.vllm_flags,
        "TUNEFORGE_SERVE_START_TIMEOUT_S": "900",
        "TUNEFORGE_TRAIN_DEVICE": summary["train_device"],
        "TUNEFORGE_TRAIN_THREADS": "4",
    }
    srv = start_server(args.work / "home", args.work / "server.log", env=env, timeout=120)
    t_start = time.monotonic()
    try:
        srv.create_keys(["gpu"])
        c = client(srv, srv.keys["gpu"])
        records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
        file_id = upload_ready(c, args.work / "zubrowka.jsonl", records)
        job = create_job(c, file_id, model=SMOLLM2, lora=True, n_epochs=5, batch_size=1, packing=False,
                         learning_rate=2e-3, n_checkpoints=1, suffix="vllm")  # fmt: skip
        t0 = time.monotonic()
        done = Watch(c, job.id).completed(timeout=args.job_timeout)
        summary["train_s"] = round(time.monotonic() - t0, 1)
        name = done.x_model_output_name
        summary["job"] = {"id": job.id, "output_name": name}
        summary["base"] = chat_checks(srv, check, SMOLLM2, expect_fact=False)
        summary["tuned"] = chat_checks(srv, check, name, expect_fact=True)
        logs = sorted((srv.home / "logs").glob("serve-*.log"))
        vllm_log = logs[0].read_text(errors="replace") if logs else ""
        summary["vllm_log_tail"] = vllm_log.splitlines()[-60:]
        check("vLLM's log says it loaded the adapter", "LoRA" in vllm_log and job.id in vllm_log)
    except Exception:
        check("no exception", False, traceback.format_exc())
    finally:
        summary["total_s"] = round(time.monotonic() - t_start, 1)
        try:
            finish_ft_server(srv)
        except BaseException as exc:  # pytest.fail from a server that died
            check("the server stopped cleanly", False, str(exc))
        summary["server_log_tail"] = srv.log_tail(80).splitlines()
        summary["checks"] = check.results
        summary["failed"] = check.failed
        out = args.summary or args.work / "vllm_check.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2, default=str))
        print(f"summary: {out}; failed: {check.failed or 'none'}", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
