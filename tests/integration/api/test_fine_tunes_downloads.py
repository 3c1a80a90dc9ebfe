"""Weight archives with byte ranges (api-contract 3.12) and the signed tokenized-dataset URL (3.11)."""

from __future__ import annotations

import io
import tarfile
from urllib.parse import urlsplit

import pytest
from together.types import FineTuneTokenizedDatasetRetrieveResponse

from tuneforge.storage.layout import archive_key


@pytest.fixture
def done(ft, train_file) -> dict:
    job = ft.create(ft.sdk_body(train_file))
    ft.finish(job["id"], steps=20, intermediate=(10,))
    return job


def _get(ft, query: str, **headers: str):
    return ft.client.get(f"/v1/finetune/download?{query}", headers={**ft.alice, **headers})


def _names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return sorted(tar.getnames())


def test_the_cli_sequence_two_bytes_then_the_rest(ft, done) -> None:
    query = f"ft_id={done['id']}&checkpoint=merged"
    head = _get(ft, query, Range="bytes=0-1")
    assert head.status_code == 206 and head.content == b"\x1f\x8b"
    total = int(head.headers["content-range"].rsplit("/", 1)[1])
    assert head.headers["content-range"] == f"bytes 0-1/{total}" and head.headers["content-length"] == "2"
    assert "x-tar" in head.headers["content-type"] and head.headers["accept-ranges"] == "bytes"
    assert "content-encoding" not in head.headers

    whole = _get(ft, query)
    assert whole.status_code == 200 and len(whole.content) == total == int(whole.headers["content-length"])
    assert _names(whole.content) == ["config.json", "model.safetensors"]
    with tarfile.open(fileobj=io.BytesIO(whole.content), mode="r:gz") as tar:
        member = tar.extractfile("model.safetensors")
        assert member is not None and member.read() == b"merged" * 5000

    rest = _get(ft, query, Range="bytes=100-")
    assert rest.status_code == 206 and rest.content == whole.content[100:]
    assert rest.headers["content-range"] == f"bytes 100-{total - 1}/{total}"
    tail = _get(ft, query, Range="bytes=-10")
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    middle = _get(ft, query, Range=f"bytes=5-{total + 50}")
    assert middle.content == whole.content[5:]
    bad = _get(ft, query, Range=f"bytes={total}-")
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{total}"
    assert "outside" in bad.json()["error"]["message"]
    assert ft.app.state.blobs.exists(archive_key(done["id"], "merged", 0))


def test_adapter_and_intermediate_archives(ft, done) -> None:
    adapter = _get(ft, f"ft_id={done['id']}&checkpoint=adapter")
    assert adapter.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(adapter.content), mode="r:gz") as tar:
        member = tar.extractfile("model.safetensors")
        assert member is not None and member.read() == b"adapter" * 5000
    step = _get(ft, f"ft_id={done['id']}&checkpoint=merged&checkpoint_step=10")
    assert step.status_code == 200
    assert _names(step.content) == ["adapter_model.safetensors", "manifest.json"]  # resume/ is never shipped
    assert _get(ft, f"ft_id={done['id']}:10").content == step.content
    final_by_step = _get(ft, f"ft_id={done['id']}&checkpoint=merged&checkpoint_step=20")
    assert final_by_step.status_code == 200 and _names(final_by_step.content) == ["config.json", "model.safetensors"]
    r = _get(ft, f"ft_id={done['id']}&checkpoint_step=7")
    assert r.status_code == 404 and r.json()["error"]["param"] == "checkpoint_step"
    r = _get(ft, f"ft_id={done['id']}&checkpoint=everything")
    assert r.status_code == 400 and r.json()["error"]["param"] == "checkpoint"


def test_what_cannot_be_downloaded(ft, train_file) -> None:
    full = ft.create(ft.sdk_body(train_file, training_type={"type": "Full"}))
    ft.finish(full["id"], full=True, intermediate=())
    r = _get(ft, f"ft_id={full['id']}&checkpoint=adapter")
    assert r.status_code == 400 and "no adapter" in r.json()["error"]["message"]
    ok = _get(ft, f"ft_id={full['id']}&checkpoint=model_output_path")
    assert ok.status_code == 200 and _names(ok.content) == ["config.json", "model.safetensors"]

    queued = ft.create(ft.sdk_body(train_file, n_epochs=2))
    r = _get(ft, f"ft_id={queued['id']}&checkpoint=merged")
    assert r.status_code == 400 and "no final weights yet" in r.json()["error"]["message"]

    unmerged = ft.create(ft.sdk_body(train_file, n_epochs=3))
    ft.finish(unmerged["id"], merged=False, intermediate=())
    r = _get(ft, f"ft_id={unmerged['id']}&checkpoint=merged")
    assert r.status_code == 404 and "merged" in r.json()["error"]["message"]


def test_a_failed_build_leaves_no_archive(ft, done, monkeypatch) -> None:
    blobs = ft.app.state.blobs
    real_open = blobs.open

    def failing_open(key: str):
        if key.endswith("model.safetensors"):
            raise OSError("disk went away")
        return real_open(key)

    monkeypatch.setattr(blobs, "open", failing_open)
    with pytest.raises(OSError):
        _get(ft, f"ft_id={done['id']}&checkpoint=merged")
    monkeypatch.undo()
    assert not blobs.exists(archive_key(done["id"], "merged", 0))
    assert _get(ft, f"ft_id={done['id']}&checkpoint=merged").status_code == 200


def test_the_tokenized_dataset_url_needs_no_key(ft, done, train_file) -> None:
    r = ft.client.get(f"/v1/fine-tunes/{done['id']}/download-tokenized-dataset", headers=ft.alice)
    assert r.status_code == 200
    info = r.json()
    FineTuneTokenizedDatasetRetrieveResponse.model_validate(info)
    url = urlsplit(info["url"])
    assert url.path == f"/downloads/fine-tunes/{done['id']}/tokenized-dataset"  # outside /v1, where keys rule
    fetched = ft.client.get(f"{url.path}?{url.query}")
    assert fetched.status_code == 200 and fetched.content == b"PAR1 tokenized PAR1" and info["size"] == 19
    forged = ft.client.get(f"{url.path}?{url.query[:-4]}beef")
    assert forged.status_code == 403
    other = ft.create(ft.sdk_body(train_file, n_epochs=2))
    stolen = ft.client.get(f"/downloads/fine-tunes/{other['id']}/tokenized-dataset?{url.query}")
    assert stolen.status_code == 403
    r = ft.client.get(f"/v1/fine-tunes/{other['id']}/download-tokenized-dataset", headers=ft.alice)
    assert r.status_code == 404 and "no tokenized dataset yet" in r.json()["error"]["message"]
