"""Benchmark: tuneforge's full dataset validation against the together SDK's structure-only `check_file`.

Generates a conversational JSONL file (multi-turn chats of varied length with system prompts, message weights,
tool calls incl. parallel ones, some reasoning, some non-ASCII text), then times `tuneforge.data.validate_path`
(every rule of api-contract 2.5) and `together.lib.utils.check_file` (UTF-8 + one JSON object per line) on it in
the same run, alternating them and keeping each one's best time. MB here means MiB (2**20 bytes).

    python bench/check_file.py [--mb 512] [--path FILE] [--repeat 3] [--workers N]

The last line printed is one JSON object: mb, tuneforge_mb_s, sdk_mb_s, ratio (wall clock, best run of each),
plus the one-process figure and the CPU-time ratio, which a noisy machine disturbs less.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

MIB = 1 << 20
T = TypeVar("T")
_VOCABULARY = (
    "the of and to in is that for it as was with be by on not this are or from at which but have an they you "
    "were there been one all we their has would when if what so no who more about up out them time into only "
    "some could new than then its also two like other people may first over years model data train loss "
    "token batch layer weight value query answer question example because should might please thanks sure"
)
WORDS = _VOCABULARY.split()
NON_ASCII = ["café", "naïve", "Zürich", "日本語", "Привет", "ñandú", "😀", "χαίρετε", "\u201cquoted\u201d"]
CITIES = ["Oslo", "Rome", "Lima", "Kyoto", "Accra", "Perth", "Quito"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    },
]


def _text(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words) + 1), rng.choice(NON_ASCII))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!", ".\n\nAlso: ok."])


def _conversation(rng: random.Random) -> dict[str, object]:
    msgs: list[dict[str, object]] = []
    if rng.random() < 0.6:
        msgs.append({"role": "system", "content": _text(rng, 5, 60)})
    weighted = rng.random() < 0.25
    with_tools = rng.random() < 0.2
    reasoning = rng.random() < 0.05
    for turn in range(rng.choice([1, 1, 2, 2, 3, 4, 6, 10])):
        msgs.append({"role": "user", "content": _text(rng, 4, 150)})
        if with_tools and rng.random() < 0.6:
            calls = [
                {
                    "id": f"call_{turn}_{i}",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": json.dumps({"city": rng.choice(CITIES), "unit": rng.choice("cf")}),
                    },
                }
                for i in range(rng.choice([1, 1, 1, 2, 3]))
            ]
            msgs.append({"role": "assistant", "content": None, "tool_calls": calls})
            for c in calls:
                msgs.append(
                    {"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"temp": rng.randint(-20, 40)})}
                )
        answer: dict[str, object] = {"role": "assistant", "content": _text(rng, 8, 400)}
        if weighted:
            answer["weight"] = rng.choice([0, 1, 1])
        if reasoning:
            answer["reasoning"] = _text(rng, 20, 120)
        msgs.append(answer)
    record: dict[str, object] = {"messages": msgs}
    if with_tools:
        record["tools"] = TOOLS
    return record


def generate(path: Path, mb: int, seed: int = 0) -> None:
    """Write about `mb` MiB (cut at a line end): a pool of distinct conversations (~110 MiB), repeated."""
    rng = random.Random(seed)
    pool = "".join(json.dumps(_conversation(rng), ensure_ascii=False) + "\n" for _ in range(20_000)).encode()
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        left = mb * MIB
        while left > 0:
            cut = len(pool) if len(pool) <= left else pool.rfind(b"\n", 0, left) + 1 or pool.find(b"\n") + 1
            piece = pool[:cut]
            f.write(piece)
            left -= len(piece)
    tmp.replace(path)


def _timed(fn: Callable[[], T]) -> tuple[T, tuple[float, float]]:
    """fn's result, its wall time and the CPU time it used (this process and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    wall, own = time.perf_counter() - t, time.process_time() - c
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, (wall, own + after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


def _warm(path: Path) -> None:
    with path.open("rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="size of the generated file in MiB (default 512)")
    parser.add_argument("--path", type=Path, help="data file to use; generated there if missing, and kept")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each tool; the best counts")
    parser.add_argument("--workers", type=int, default=None, help="tuneforge processes (default: its own choice)")
    args = parser.parse_args()

    from together.lib.utils.files import check_file as sdk_check_file

    from tuneforge.data import validate_path
    from tuneforge.data.validation.parallel import free_cpus

    folder = None
    if args.path is None:
        folder = Path(tempfile.mkdtemp(prefix="tf-bench-"))
        path = folder / "conversations.jsonl"
    else:
        path = args.path
    try:
        if not path.exists():
            t = time.perf_counter()
            generate(path, args.mb)
            print(f"generated {path} in {time.perf_counter() - t:.1f} s")
        size = path.stat().st_size
        mb = size / MIB
        _warm(path)
        workers = args.workers if args.workers is not None else free_cpus()
        print(f"file: {mb:.1f} MiB; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; tuneforge workers: {workers}")

        runs: dict[str, list[tuple[float, float]]] = {"tf": [], "tf1": [], "sdk": []}
        report = None
        for _ in range(args.repeat):  # interleaved, so that a noisy moment hits both tools alike
            report, timing = _timed(lambda: validate_path(path, workers=workers))
            runs["tf"].append(timing)
            sdk, timing = _timed(lambda: sdk_check_file(path))
            runs["sdk"].append(timing)
            assert sdk["is_check_passed"], sdk["message"]
            runs["tf1"].append(_timed(lambda: validate_path(path, workers=1))[1])
        assert report is not None and report.valid, report.error_summary() if report else "no report"
        wall = {k: min(w for w, _ in v) for k, v in runs.items()}
        cpu = {k: min(c for _, c in v) for k, v in runs.items()}

        result = {
            "mb": round(mb, 1),
            "tuneforge_mb_s": round(mb / wall["tf"], 1),
            "sdk_mb_s": round(mb / wall["sdk"], 1),
            "ratio": round(wall["sdk"] / wall["tf"], 2),
            "tuneforge_1proc_mb_s": round(mb / wall["tf1"], 1),
            "ratio_1proc": round(wall["sdk"] / wall["tf1"], 2),
            "ratio_cpu_time": round(cpu["sdk"] / cpu["tf"], 2),
            "workers": workers,
            "repeat": args.repeat,
            "lines": report.num_samples,
            "dataset_format": report.dataset_format,
        }
        for key, label in (("tf", f"{workers} proc"), ("tf1", "1 proc")):
            print(f"tuneforge validate_path, all rules, {label:7s}: {wall[key]:.2f} s = {mb / wall[key]:.1f} MiB/s")
        print(f"together check_file, structure only:     {wall['sdk']:.2f} s = {result['sdk_mb_s']} MiB/s")
        one, cpu_ratio = result["ratio_1proc"], result["ratio_cpu_time"]
        print(f"ratio {result['ratio']}x ({one}x in one process; {cpu_ratio}x in CPU time)")
        print(json.dumps(result))
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
