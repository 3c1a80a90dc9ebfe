"""Server memory during a large upload: a 2 GB file through the real together SDK, server RSS sampled.

Starts `tuneforge serve` as a child process, uploads a generated JSONL file of --gb gigabytes with
`client.files.upload`, samples the server's resident memory every 50 ms from /proc during the upload
and the server-side validation that follows, and prints the figures. Goal: peak RSS under 200 MB.

`--storage s3` keeps the server's storage in a bucket on an S3-compatible server started here (moto's server mode,
tests/s3_support.py): the SDK then PUTs the bytes to the bucket's presigned URL, and the figures add how many PUTs
the API server's access log shows (goal: 0) and how many the bucket received.
Last line: one JSON object with upload_gb, baseline_rss_mb, peak_rss_mb, upload_mb_s, validate_s, storage (and
with s3: server_puts, bucket_puts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_file(path: Path, size: int) -> None:
    rows = []
    for i in range(200):
        msgs = [
            {"role": "system", "content": "You are a helpful support agent."},
            {"role": "user", "content": f"Question {i}: " + "how do I reset my password? " * (i % 7 + 1)},
            {"role": "assistant", "content": "Open Settings, then Security, then Reset. " * (i % 5 + 1)},
        ]
        rows.append(json.dumps({"messages": msgs}) + "\n")
    block = "".join(rows).encode()
    with open(path, "wb") as fh:
        written = 0
        while written + len(block) <= size:
            fh.write(block)
            written += len(block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--storage", choices=("local", "s3"), default="local")
    args = ap.parse_args()

    from together import Together

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tf-upload-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    data = work / "big.jsonl"
    size = int(args.gb * (1 << 30))
    if not data.exists() or abs(data.stat().st_size - size) > (1 << 20):
        print(f"writing {args.gb} GB test file to {data}", flush=True)
        make_file(data, size)
    size = data.stat().st_size

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, TUNEFORGE_LOG_LEVEL="warning")
    s3 = None
    if args.storage == "s3":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from s3_support import S3Server

        s3 = S3Server.start(work / "moto.log")
        # The access log (info) is what shows whether an upload's bytes passed through the server.
        env.update(s3.env(), TUNEFORGE_STORAGE_URL=s3.bucket_url(f"bench-{port}"), TUNEFORGE_LOG_LEVEL="info")
    server_log = (work / "server.log").open("ab")
    key = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "keys", "create", "--name", "bench", "--home", str(home)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    server = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "serve", "--port", str(port), "--home", str(home)],
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        baseline = rss_mb(server.pid)
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(rss_mb(server.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        client = Together(api_key=key, base_url=f"{base}/v1", timeout=600, max_retries=0)
        t0 = time.perf_counter()
        f = client.files.upload(file=data, purpose="fine-tune", check=False)
        upload_s = time.perf_counter() - t0
        peak_upload = max(samples)
        t1 = time.perf_counter()
        info = client.files.retrieve(f.id)
        while info.processing_status in ("QUEUED", "RUNNING", "PENDING", None):
            time.sleep(0.2)
            info = client.files.retrieve(f.id)
        validate_s = time.perf_counter() - t1
        stop.set()
        sampler.join()
        peak = max(samples)
    finally:
        server.terminate()
        server.wait(timeout=30)
        server_log.close()
        if s3 is not None:
            s3.stop()
    figures: dict[str, object] = {"storage": args.storage}
    if s3 is not None:
        log = (work / "server.log").read_text(errors="replace")
        figures["server_puts"] = len(re.findall(r'"PUT [^"]*HTTP/1\.1"', log))
        # The client's PUTs carry the presigned signature (the server's own copies inside the bucket carry none).
        figures["bucket_puts"] = len(re.findall(r'"PUT /bench-[^"]*X-Amz-Signature=[^"]*HTTP/1\.1" 200', s3.log()))
        print(f"PUTs in the API server's access log: {figures['server_puts']}; PUTs the bucket took: "
              f"{figures['bucket_puts']}")  # fmt: skip

    print(f"file: {size / 1e9:.2f} GB; upload {upload_s:.1f} s ({size / 1e6 / upload_s:.0f} MB/s)")
    print(f"server RSS: baseline {baseline:.0f} MB, peak in upload {peak_upload:.0f} MB, peak overall {peak:.0f} MB")
    print(f"server-side validation: {validate_s:.1f} s, status {info.processing_status}")
    print(
        json.dumps(
            {
                "upload_gb": round(size / (1 << 30), 3),
                "baseline_rss_mb": round(baseline, 1),
                "peak_rss_upload_mb": round(peak_upload, 1),
                "peak_rss_mb": round(peak, 1),
                "upload_mb_s": round(size / 1e6 / upload_s, 1),
                "validate_s": round(validate_s, 2),
                "processing_status": info.processing_status,
                **figures,
            }
        )
    )


if __name__ == "__main__":
    main()
