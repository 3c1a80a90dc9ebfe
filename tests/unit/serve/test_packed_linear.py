"""`serve/packed.Linear`: bf16 CPU weights prepacked for oneDNN give exactly what `torch.nn.functional.linear`
gives, at any row count, with and without a bias; fp32 weights are left unpacked; a packing that fails or
disagrees falls back to the plain matmul with a warning; nothing is packed on a server's main thread."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from tuneforge.serve import packed
from tuneforge.serve.packed import Linear, packing_available
from tuneforge.serve.threads import off_main_thread, off_thread

needs_onednn = pytest.mark.skipif(
    not packing_available(torch.zeros(2, 2, dtype=torch.bfloat16)), reason="torch built without oneDNN"
)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_packed_equals_plain_linear(bias):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(96, generator=gen).to(torch.bfloat16) if bias else None
    with torch.inference_mode():
        linear = Linear(weight, b, pack=True)
        assert linear.packed is not None
        for rows in (1, 5, 32, 33, 300):
            x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
            assert torch.equal(linear(x), torch.nn.functional.linear(x, weight, b))
        x = torch.randn(8, 128, generator=gen).to(torch.bfloat16)[:, :64]  # rows strided
        assert torch.equal(linear(x), torch.nn.functional.linear(x, weight, b))


def test_fp32_and_unasked_weights_stay_plain():
    weight = torch.randn(16, 8)
    assert Linear(weight, None, pack=True).packed is None  # fp32: packing measured slower at one row
    bf16 = weight.to(torch.bfloat16)
    assert Linear(bf16, None, pack=False).packed is None
    x = torch.randn(3, 8)
    assert torch.equal(Linear(weight, None, pack=True)(x), torch.nn.functional.linear(x, weight))


@needs_onednn
def test_failed_or_wrong_packing_falls_back_to_plain(monkeypatch, caplog):
    weight = torch.randn(16, 8).to(torch.bfloat16)

    def broken(w, rows):
        raise RuntimeError("no primitive for this shape")

    with monkeypatch.context() as m:
        m.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken)
        with caplog.at_level(logging.WARNING, logger=packed.__name__):
            linear = Linear(weight, None, pack=True)
    assert linear.packed is None and "packing failed" in caplog.text
    x = torch.randn(2, 8).to(torch.bfloat16)
    assert torch.equal(linear(x), torch.nn.functional.linear(x, weight))

    caplog.clear()
    real = torch.ops.mkldnn._linear_pointwise
    with monkeypatch.context() as m:
        m.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: real(*a) + 1)
        with caplog.at_level(logging.WARNING, logger=packed.__name__):
            assert Linear(weight, None, pack=True).packed is None
    assert "differs" in caplog.text


def test_off_main_thread_moves_work_off_the_main_thread_only():
    assert threading.current_thread() is threading.main_thread()
    assert off_main_thread(threading.current_thread) is not threading.main_thread()
    inner = off_thread(lambda: (threading.current_thread(), off_main_thread(threading.current_thread)))
    assert inner[0] is inner[1]  # already off the main thread: run in place
    with pytest.raises(ValueError, match="boom"):
        off_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))
