"""The `tuneforge` command as a user runs it: keys, models and check."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def tf(*args: str, home, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", *args, "--home", str(home)] if args[0] != "check" else
        [sys.executable, "-m", "tuneforge.cli", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_keys_create_prints_only_the_key_and_list_never_shows_it(tmp_path):
    created = tf("keys", "create", "--name", "ci", home=tmp_path)
    assert created.returncode == 0
    key = created.stdout.strip()
    assert key.startswith("tf-") and "\n" not in key
    listed = tf("keys", "list", home=tmp_path)
    assert "ci" in listed.stdout and key not in listed.stdout and key[7:] not in listed.stdout
    assert tf("keys", "revoke", "ci", home=tmp_path).returncode == 0
    assert "revoked" in tf("keys", "list", home=tmp_path).stdout
    missing = tf("keys", "revoke", "nobody", home=tmp_path)
    assert missing.returncode == 1 and "no active API key" in missing.stderr


def test_models_add_list_remove(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    added = tf("models", "add", "team/tiny", "--source", f"local:{folder}", "--max-seq-length", "256", home=tmp_path)
    assert added.returncode == 0, added.stderr
    listed = tf("models", "list", home=tmp_path).stdout
    assert "team/tiny" in listed and "HuggingFaceTB/SmolLM2-135M-Instruct" in listed and "256" in listed
    again = tf("models", "add", "team/tiny", "--source", f"local:{folder}", home=tmp_path)
    assert again.returncode == 1 and "already in the catalog" in again.stderr
    bad = tf("models", "add", "x", "--source", "ftp:somewhere", home=tmp_path)
    assert bad.returncode == 2 and "KIND:LOCATION" in bad.stderr
    assert tf("models", "remove", "team/tiny", home=tmp_path).returncode == 0
    assert "team/tiny" not in tf("models", "list", home=tmp_path).stdout
    builtin = tf("models", "remove", "HuggingFaceTB/SmolLM2-135M-Instruct", home=tmp_path)
    assert builtin.returncode == 1 and "built in" in builtin.stderr
    # the hosted service's names (on by default; the suite turns them off), with their size and whether downloaded
    hosted = tf("models", "list", home=tmp_path, env={"TUNEFORGE_HOSTED_CATALOG": "1"}).stdout.splitlines()
    assert hosted[0].split() == ["NAME", "SOURCE", "PARAMS", "MAX", "SEQ", "LORA", "FULL", "DPO", "VISION",
                                 "DOWNLOADED"]  # fmt: skip
    [llama] = [line.split() for line in hosted if line.startswith("meta-llama/Meta-Llama-3.1-8B-Instruct-Reference ")]
    assert llama[1:] == ["hub:meta-llama/Llama-3.1-8B-Instruct", "8B", "131072", "True", "True", "True", "False",
                         "False"]  # fmt: skip
    assert len(hosted) > 30


def test_check_prints_line_and_field_and_json_report(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    ok = tf("check", str(good), home=tmp_path)
    assert ok.returncode == 0 and "valid" in ok.stdout
    failed = tf("check", str(bad), home=tmp_path)
    assert failed.returncode == 1 and "line 2" in failed.stdout and "messages[0].role" in failed.stdout
    report = json.loads(tf("check", str(bad), "--json", home=tmp_path).stdout)
    assert report["is_check_passed"] is False and report["errors"][0]["line"] == 2
