"""`catalog/inspect.refuse_unusable`: each reason a bring-your-own-model repo cannot be trained, in the order a
user can act on them, each naming from_hf_model and the figures behind it."""

from __future__ import annotations

import pytest

from tuneforge.catalog.inspect import HubModelInfo, refuse_unusable, training_bytes
from tuneforge.errors import InvalidRequestError

GIB = 2**30


def info(**changes) -> HubModelInfo:
    base = {"repo": "org/model", "revision": None, "architectures": ("LlamaForCausalLM",), "model_type": "llama",
            "weight_bytes": 2 * 10**9, "params": 10**9, "has_chat_template": True}  # fmt: skip
    return HubModelInfo(**(base | changes))


def refuse(i: HubModelInfo, **kw) -> str:
    args = {"template": "org/template-1b", "template_params": 10**9, "training_type": "lora",
            "conversational": True, "host_bytes": 64 * GIB} | kw  # fmt: skip
    with pytest.raises(InvalidRequestError) as caught:
        refuse_unusable(i, **args)
    assert caught.value.param == "from_hf_model"
    return caught.value.message


def test_a_usable_model_passes():
    refuse_unusable(info(), template="t", template_params=10**9, training_type="lora", conversational=True,
                    host_bytes=64 * GIB)  # fmt: skip
    refuse_unusable(info(architectures=("GPT2LMHeadModel",), has_chat_template=False), template="t",
                    template_params=None, training_type="full", conversational=False, host_bytes=0)  # fmt: skip


def test_each_reason_is_named():
    assert "not a causal language model" in refuse(info(architectures=("BertModel",)))
    assert "no architecture" in refuse(info(architectures=()))
    assert "no safetensors weights" in refuse(info(weight_bytes=0))
    assert "about 120B parameters" in refuse(info(params=120 * 10**9), template_params=None, host_bytes=0)
    too_big = refuse(info(params=3 * 10**9))  # 3x the template's 1B
    assert "3.0B parameters" in too_big and "1.0B of model 'org/template-1b'" in too_big
    full = refuse(info(), training_type="full", host_bytes=8 * GIB)  # 1B x 16 bytes > 8 GiB
    assert "14.9 GiB of memory to train (full:" in full and "8.0 GiB" in full
    assert "no chat template" in refuse(info(has_chat_template=False))


def test_training_bytes_count_adam_for_full_training_only():
    assert training_bytes(10**9, "lora") == 4 * 10**9 and training_bytes(10**9, "full") == 16 * 10**9
