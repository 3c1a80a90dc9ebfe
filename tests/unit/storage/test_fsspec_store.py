"""BlobStore behaviour on a local folder and in memory: atomic writes, listing, deletion."""

import uuid

import pytest

from tuneforge.errors import NotFoundError, StorageError
from tuneforge.storage import open_blob_store


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return open_blob_store(str(tmp_path / "blobs"))
    return open_blob_store(f"memory://tf-{uuid.uuid4().hex}")


def test_write_is_invisible_until_commit(store):
    w = store.writer("files/a")
    w.write(b"hello ")
    w.write(b"world")
    assert not store.exists("files/a")
    w.commit()
    assert store.exists("files/a")
    assert store.size("files/a") == 11
    with store.open("files/a") as fh:
        assert fh.read() == b"hello world"


def test_abort_leaves_nothing_behind(store):
    w = store.writer("files/b")
    w.write(b"partial")
    w.abort()
    assert not store.exists("files/b")
    assert store.list("files") == []
    assert store.list(".tmp") == []


def test_list_and_delete_prefix(store):
    for n in (1, 2, 3):
        with store.writer(f"uploads/x/part-{n}") as w:
            w.write(b"p")
    assert store.list("uploads/x") == ["uploads/x/part-1", "uploads/x/part-2", "uploads/x/part-3"]
    store.delete_prefix("uploads/x")
    assert store.list("uploads/x") == []


def test_missing_blob_is_not_found(store):
    with pytest.raises(NotFoundError):
        store.open("files/none")
    store.delete("files/none")  # deleting twice is fine


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a"])
def test_keys_cannot_escape_the_root(store, key):
    with pytest.raises(StorageError):
        store.writer(key)


def test_local_path_only_for_local_folders(tmp_path):
    local = open_blob_store(str(tmp_path / "b"))
    assert local.local_path("files/x") == str(tmp_path / "b" / "files" / "x")
    assert open_blob_store("memory://x").local_path("files/x") is None


def test_sweep_removes_only_old_temporary_writes(store):
    old = store.writer("files/crashed")
    old.write(b"half")
    assert store.sweep_temporary(older_than_s=3600) == 0
    assert store.sweep_temporary(older_than_s=-1) == 1
    assert store.list(".tmp") == []


def test_a_touched_write_is_not_taken_for_a_crashed_one(tmp_path):
    """A slow write (an upload whose bytes trickle in) is touched while it runs: the sweep leaves it alone."""
    import os
    import time

    store = open_blob_store(str(tmp_path / "blobs"))
    slow = store.writer("files/slow")
    slow.write(b"half")
    (temp,) = (tmp_path / "blobs" / ".tmp").iterdir()
    os.utime(temp, (time.time() - 100, time.time() - 100))
    slow.touch()
    assert store.sweep_temporary(older_than_s=60) == 0
    slow.write(b" and the rest")
    slow.commit()
    assert store.open("files/slow").read() == b"half and the rest"
    slow.touch()  # after the commit: nothing to keep
