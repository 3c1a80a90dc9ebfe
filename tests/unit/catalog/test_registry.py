"""The catalog: built-in SmolLM2, models added and removed, persisted in the blob store."""

import uuid

import pytest

from tuneforge.catalog.entries import SMOLLM2, ModelEntry
from tuneforge.catalog.registry import Catalog
from tuneforge.errors import ConflictError, InvalidRequestError, NotFoundError
from tuneforge.storage import open_blob_store


@pytest.fixture
def catalog():
    return Catalog(open_blob_store(f"memory://cat-{uuid.uuid4().hex}"))


def test_builtin_model_is_listed(catalog):
    assert catalog.get(SMOLLM2.name).source_kind == "gguf-package"
    assert SMOLLM2.name in [e.name for e in catalog.list()]


def test_add_persist_remove(catalog, tmp_path):
    entry = ModelEntry(name="local/tiny", source_kind="local", source=str(tmp_path)).with_limits(max_seq_length=256)
    catalog.add(entry)
    again = Catalog(catalog._blobs).get("local/tiny")
    assert again == entry and again.limits.max_seq_length == 256
    with pytest.raises(ConflictError):
        catalog.add(entry)
    catalog.remove("local/tiny")
    with pytest.raises(NotFoundError, match="not found in the catalog"):
        catalog.get("local/tiny")


def test_builtin_cannot_be_removed_and_bad_sources_are_refused(catalog):
    with pytest.raises(InvalidRequestError, match="built in"):
        catalog.remove(SMOLLM2.name)
    with pytest.raises(InvalidRequestError, match="source kind"):
        catalog.add(ModelEntry(name="x", source_kind="ftp", source="x"))  # type: ignore[arg-type]
