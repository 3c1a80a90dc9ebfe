"""Helpers for the fine-tuning end-to-end tests: a live server with tiny models in its catalog, datasets, jobs
driven through the real `together` SDK and CLI, weight archives, and the training processes a server leaves behind.

Builds on e2e_support (the server subprocess, keys made by the real `tuneforge keys create`). Like it, it reaches the
server over HTTP or through the `tuneforge` command; the only package code it runs is the dev helper that writes tiny
model folders (`tuneforge.train.tiny_models`). To stage storage faults it touches a stored file's blob
(`<home>/blobs/files/<id>`) directly. torch, transformers and peft are imported lazily, by the helpers that load
downloaded weights.

Every run of a job is a child process `python -m tuneforge.train <home>/work/<job>/spec-N.json` in its own session:
it outlives the server on purpose, so the servers started here kill whatever such process of their home is left
when they are finished.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    UNFINISHED,
    LiveServer,
    opened,
    put_bytes,
    run_together,
    start_server,
    tuneforge_cli,
    wait_processed_sdk,
    wait_until,
    write_jsonl,
)
from together import Together

TINY_LLAMA = "tiny/llama"
TINY_QWEN3 = "tiny/qwen3"
TINY_MODELS = {TINY_LLAMA: "llama", TINY_QWEN3: "qwen3"}
TERMINAL = frozenset({"completed", "cancelled", "error", "user_error"})
ALL_STATUSES = frozenset({"pending", "queued", "running", "compressing", "uploading", "cancel_requested", *TERMINAL})
JOB_ID_RE = re.compile(r"ft-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# One torch thread per run: on a small shared machine, a run that takes every core spends most of its time
# waiting for a busy one (a tiny model's step takes ~2 s with 2 threads next to another process, ~0.05 s with 1).
TRAIN_ENV = {"TUNEFORGE_TRAIN_THREADS": "1"}
# The lifecycle of a completed job, as event types in the order they must appear (others may come in between).
COMPLETED_LIFECYCLE = ("job_pending", "job_start", "training_start", "model_uploading", "job_complete")


# --- the server ---------------------------------------------------------------------------------------------------


def save_tiny(folder: Path, arch: str) -> Path:
    """A tiny random model with a ChatML tokenizer (~100k parameters), written by the package's dev helper."""
    from tuneforge.train.tiny_models import save_tiny_model

    if not (folder / "config.json").is_file():
        save_tiny_model(folder, arch)
    return folder


def add_models(server: LiveServer, models_dir: Path, models: dict[str, str] | None = None) -> None:
    """Register tiny models in the server's catalog with the real `tuneforge models add` (re-read on each call)."""
    for name, arch in (models or TINY_MODELS).items():
        folder = save_tiny(models_dir / arch, arch)
        out = tuneforge_cli("models", "add", name, "--source", f"local:{folder}", home=server.home, env=server.env)
        assert name in out, out


def trainer_pids(home: Path, needle: str | None = None) -> list[int]:
    """Live `tuneforge.train` processes whose command line names this home (and `needle`, e.g. a job id)."""
    homes = {f"{home}/", f"{home.resolve()}/"}  # runs are started as `... <home>/work/<job>/spec-N.json`
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z" or "tuneforge.train" not in cmdline or not any(h in cmdline for h in homes):
            continue
        if needle is None or needle in cmdline:
            found.append(int(entry.name))
    return found


def kill_trainers(home: Path, needle: str | None = None, timeout: float = 10) -> list[int]:
    """SIGKILL the training processes of this home (optionally only those naming `needle`); wait until gone."""
    pids = trainer_pids(home, needle)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while trainer_pids(home, needle) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def start_ft_server(
    root: Path, *, name: str = "ft", slots: int = 1, env: dict[str, str] | None = None, home: Path | None = None
) -> LiveServer:
    """`tuneforge serve` with `slots` training slots and one torch thread per run. On a new home (`home` None) the
    tiny models are registered; a given home is reused as it is (a restart)."""
    full_env = {**TRAIN_ENV, "TUNEFORGE_TRAIN_SLOTS": str(slots), **(env or {})}
    n = len(list(root.glob(f"{name}-server*.log")))
    server = start_server(home or root / f"{name}-home", root / f"{name}-server{n}.log", env=full_env)
    if home is None:
        try:
            add_models(server, root / "models")
        except BaseException:
            server.stop()
            raise
    return server


@contextlib.contextmanager
def ft_server(
    root: Path, *, owners: Iterable[str] = ("alice", "bob"), slots: int = 1, env: dict[str, str] | None = None
) -> Iterator[LiveServer]:
    """A fine-tuning server with a key per owner; at exit it is stopped (and checked) and its runs are killed."""
    server = start_ft_server(root, slots=slots, env=env)
    try:
        server.create_keys(list(owners))
        yield server
    finally:
        finish_ft_server(server)


def finish_ft_server(server: LiveServer) -> None:
    """Stop the server (a server that died fails the test), then kill the runs it leaves behind."""
    try:
        server.finish()
    finally:
        left = kill_trainers(server.home)
        if left:
            print(f"killed {len(left)} leftover training process(es) of {server.home}: {left}")


def client(server: LiveServer, key: str, *, strict: bool = False) -> Together:
    """An SDK client; `strict` validates every answer against the SDK's models (as `_strict_response_validation`
    does: a missing or mistyped required field, or a value outside a declared enum, raises)."""
    return server.client(key, _strict_response_validation=strict)


# --- datasets -----------------------------------------------------------------------------------------------------

# Made-up facts: answers the tiny model cannot know, so a falling loss means it learned them.
FACTS = [
    ("What is the secret word of the blue door?", "The secret word of the blue door is marmalade."),
    ("Which planet does Captain Vorn come from?", "Captain Vorn comes from the planet Quelb."),
    ("How many moons does Quelb have?", "Quelb has seven moons."),
    ("What colour is the zibber fruit?", "The zibber fruit is bright orange."),
    ("Who built the tower of Ostra?", "The tower of Ostra was built by Mira Lunn."),
    ("What does a snorkelbird eat?", "A snorkelbird eats only tiny silver fish."),
    ("When does the Fenwick festival start?", "The Fenwick festival starts on the third of May."),
    ("What is the password of the old mill?", "The password of the old mill is pumpernickel."),
]


def qa_records(n: int = 8, *, nonce: str = "", system: str | None = None) -> list[dict[str, Any]]:
    """`n` single-turn conversations with distinctive answers (cycled from FACTS; `nonce` keeps files unique)."""
    records = []
    for i in range(n):
        question, answer = FACTS[i % len(FACTS)]
        messages = [{"role": "system", "content": system}] if system else []
        suffix = f" ({nonce} {i})" if nonce else ""
        messages += [{"role": "user", "content": question + suffix}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages})
    return records


def upload_ready(c: Together, path: Path, records: list[dict[str, Any]] | None = None) -> str:
    """Upload a JSONL file with the SDK and wait until the server's check passed; returns the file id."""
    if records is not None:
        write_jsonl(path, records)
    f = c.files.upload(file=path, purpose="fine-tune")
    done = wait_processed_sdk(c, f.id)
    assert done.processing_status == "COMPLETED", done
    return f.id


@contextlib.contextmanager
def check_held(server: LiveServer, key: str, data: bytes, *, file_name: str = "held.jsonl") -> Iterator[str]:
    """A file the server is still checking, for as long as the block runs; yields its id.

    The bytes are uploaded, then the stored blob is swapped for a named pipe before `/preprocess`: the checker
    opens it and waits for a writer. At exit the bytes are written into the pipe (the check then completes) and the
    blob becomes a plain file again.
    """
    with server.http(key) as http:
        up = opened(http, data=data, file_name=file_name)
        assert put_bytes(up.location, data).status_code == 200
        blob = server.blobs / "files" / up.file_id
        assert blob.is_file(), f"no blob at {blob}"
        blob.unlink()
        os.mkfifo(blob)
        try:
            r = http.post(f"/v1/files/{up.file_id}/preprocess")
            assert r.status_code == 200, r.text
            wait_until(
                lambda: http.get(f"/v1/files/{up.file_id}").json().get("processing_status") == "RUNNING",
                timeout=10,
                what="the check to start",
            )
            yield up.file_id
        finally:
            writer = threading.Thread(target=lambda: blob.write_bytes(data), daemon=True)
            writer.start()  # blocks until the checker has the pipe open, which it has (or is about to)
            writer.join(10)
            wait_until(
                lambda: http.get(f"/v1/files/{up.file_id}").json().get("processing_status") not in UNFINISHED,
                timeout=10,
                what="the held check to finish",
            )
            tmp = blob.with_name(blob.name + ".restore")
            tmp.write_bytes(data)
            os.replace(tmp, blob)


# --- jobs ---------------------------------------------------------------------------------------------------------

SMALL_LORA: dict[str, Any] = {
    "lora": True,
    "n_epochs": 3,
    "batch_size": 2,
    "packing": False,
    "learning_rate": 1e-2,
    "n_checkpoints": 2,
    "suffix": "e2e",
    "train_on_inputs": "auto",
}


def create_job(c: Together, file_id: str, model: str = TINY_LLAMA, **kwargs: Any) -> Any:
    """`client.fine_tuning.create` with small-job defaults (SMALL_LORA), overridden by `kwargs`."""
    params = {**SMALL_LORA, **kwargs}
    job = c.fine_tuning.create(training_file=file_id, model=model, **params)
    assert JOB_ID_RE.fullmatch(job.id), job.id
    assert job.status in ("pending", "queued"), job.status
    return job


class Watch:
    """Polls a job with `retrieve` and remembers every status seen, in order (repeats collapsed)."""

    def __init__(self, c: Together, job_id: str) -> None:
        self.c = c
        self.job_id = job_id
        self.statuses: list[str] = []
        self.last: Any = None

    def poll(self) -> Any:
        job = self.c.fine_tuning.retrieve(self.job_id)
        status = str(job.status)
        assert status in ALL_STATUSES, f"unknown status {status!r}"
        if not self.statuses or self.statuses[-1] != status:
            self.statuses.append(status)
        self.last = job
        return job

    def until(self, predicate: Callable[[Any], Any], *, timeout: float, what: str, interval: float = 0.15) -> Any:
        """Poll until `predicate(job)` is true; fails (with the job's last events) after `timeout` seconds."""

        def check() -> Any:
            job = self.poll()
            return job if predicate(job) else None

        try:
            return wait_until(check, timeout=timeout, what=f"{what} of {self.job_id}", interval=interval)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; statuses seen {self.statuses}; events:\n{events_text(self.c, self.job_id)}"
            ) from None

    def finished(self, timeout: float = 120) -> Any:
        return self.until(lambda j: j.status in TERMINAL, timeout=timeout, what="a terminal status")

    def completed(self, timeout: float = 120) -> Any:
        job = self.finished(timeout)
        assert job.status == "completed", f"{self.job_id} ended {job.status}: {events_text(self.c, self.job_id)}"
        return job


def events(c: Together, job_id: str) -> list[Any]:
    return list(c.fine_tuning.list_events(job_id).data or [])


def event_types(c: Together, job_id: str) -> list[str]:
    return [str(e.type) for e in events(c, job_id)]


def events_text(c: Together, job_id: str) -> str:
    try:
        return "\n".join(f"  {e.created_at} {e.type}: {e.message}" for e in events(c, job_id))
    except Exception as exc:  # only for failure messages
        return f"  (events unavailable: {exc})"


def assert_subsequence(seen: list[str], expected: Iterable[str]) -> None:
    """Each of `expected` appears in `seen`, in this order (other items may come in between)."""
    it = iter(seen)
    for item in expected:
        assert any(s == item for s in it), f"{item!r} missing (or out of order) in {seen}"


def checkpoints(c: Together, job_id: str) -> list[Any]:
    return list(c.fine_tuning.list_checkpoints(job_id).data or [])


def intermediate_steps(c: Together, job_id: str) -> list[int]:
    return sorted(int(cp.step) for cp in checkpoints(c, job_id) if "intermediate" in cp.checkpoint_type.lower())


def metrics(c: Together, job_id: str) -> list[dict[str, Any]]:
    return list(c.fine_tuning.list_metrics(job_id).metrics or [])


def train_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "train/loss" in r]


# --- weights ------------------------------------------------------------------------------------------------------


def extract_archive(data: bytes, dest: Path) -> list[str]:
    """Unpack a `.tar.gz` weights archive into `dest`; returns its member names."""
    assert data[:2] == b"\x1f\x8b", f"not gzip data: {data[:16]!r}"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(dest, filter="data")
    return names


def download(c: Together, dest: Path, job_id: str, **kwargs: Any) -> list[str]:
    """`client.fine_tuning.content(ft_id=…, **kwargs)` unpacked into `dest`; returns the member names."""
    data = c.fine_tuning.content(ft_id=job_id, **kwargs).read()
    return extract_archive(data, dest)


def load_causal_lm(folder: Path, adapter: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a weights folder, with a peft adapter on top when `adapter` is given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter if adapter is not None else folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval(), tokenizer


def generate(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 12) -> str:
    """Greedy answer to one user message, through the tokenizer's chat template."""
    import torch

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1], "generated nothing"
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def answer_loss(model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> float:
    """Mean cross-entropy of the assistant answers (and their end-of-turn token) given their prompts."""
    import torch

    total, count = 0.0, 0
    for r in records:
        *context, answer = r["messages"]
        prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + a_ids])
        labels = torch.tensor([[-100] * len(p_ids) + a_ids])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * len(a_ids)
        count += len(a_ids)
    return total / count


def logits(model: Any, tokenizer: Any, text: str) -> Any:
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits


# --- the together CLI ---------------------------------------------------------------------------------------------


def run_together_all(
    server: LiveServer, key: str, commands: list[tuple[str, ...]], *, cwd: Path, check: bool = True
) -> list[subprocess.CompletedProcess[str]]:
    """Several independent CLI runs side by side (each pays the CLI's start-up time)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        futures = [pool.submit(run_together, server, key, *cmd, cwd=cwd, check=check) for cmd in commands]
        return [f.result() for f in futures]


def skip_without_training() -> None:
    """Skip when the SFT recipe is not there yet (it is being written alongside these tests)."""
    if importlib.util.find_spec("tuneforge.train.recipes.sft") is None:
        pytest.skip("the SFT recipe (tuneforge.train.recipes.sft) is not available yet")
