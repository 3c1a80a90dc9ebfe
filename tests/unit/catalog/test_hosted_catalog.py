"""The hosted service's models by name (`catalog/hosted.py`): at least 30, of every family the issue names, each a hub
repo with its parameter count and context length; listed by the catalog unless turned off, and never removable."""

from __future__ import annotations

import uuid

import pytest

from tuneforge.catalog.entries import BUILTIN
from tuneforge.catalog.hosted import HOSTED, MAX_CONTEXT
from tuneforge.catalog.registry import Catalog
from tuneforge.errors import InvalidRequestError
from tuneforge.storage import open_blob_store


def test_at_least_thirty_models_of_each_family_with_their_facts():
    names = [e.name for e in HOSTED]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert not set(names) & {e.name for e in BUILTIN}
    for family in ("Llama-3", "Qwen2.5", "Qwen3", "DeepSeek-R1", "gemma-2", "gemma-3", "Mistral", "Phi", "SmolLM2",
                   "SmolVLM"):  # fmt: skip
        assert any(family.lower() in n.lower() for n in names), family
    assert "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference" in names
    for e in HOSTED:
        assert e.source_kind == "hub" and e.source.count("/") == 1, e
        assert e.params and 1e8 < e.params < 1e11, e
        assert 2048 <= e.limits.max_seq_length == e.limits.max_seq_length_dpo <= MAX_CONTEXT, e
        assert e.limits.supports_dpo is not e.limits.supports_vision, e  # preference tuning trains text models only
        assert e.limits.supports_lora and e.limits.default_lora_rank == 8
    assert {e.name for e in HOSTED if e.limits.supports_vision} >= {"google/gemma-3-4b-it",
                                                                     "HuggingFaceTB/SmolVLM-256M-Instruct"}  # fmt: skip


def test_the_catalog_lists_them_unless_turned_off():
    blobs = open_blob_store(f"memory://hosted-{uuid.uuid4().hex}")
    on, off = Catalog(blobs), Catalog(blobs, hosted=False)
    assert {e.name for e in HOSTED} <= {e.name for e in on.list()}
    assert [e.name for e in off.list()] == sorted(e.name for e in BUILTIN)
    assert on.get("Qwen/Qwen2.5-7B-Instruct").source == "Qwen/Qwen2.5-7B-Instruct"
    assert off.find("Qwen/Qwen2.5-7B-Instruct") is None
    with pytest.raises(InvalidRequestError, match="built in"):
        on.remove("Qwen/Qwen2.5-7B-Instruct")
