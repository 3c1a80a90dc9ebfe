"""The fused, chunked head loss equals the plain one (logits, then cross-entropy, then autograd): same loss, same
argmax hits, same gradients for the hidden states, the head's weight and bias, with or without a logit scale,
however many chunks it takes; evaluation (no grad) gives the same sums; soft-capped heads take the plain path."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tuneforge.train import loss as loss_mod
from tuneforge.train.loss import head_loss

VOCAB, HIDDEN, N = 97, 16, 45


class _LM(torch.nn.Module):
    def __init__(self, bias: bool, **config: float) -> None:
        super().__init__()
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias)
        self.config = SimpleNamespace(**config)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def _reference(lm: _LM, hidden: torch.Tensor, targets: torch.Tensor, scale: float, cap: float | None = None):
    logits = lm.head(hidden).float() * scale
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, HIDDEN, generator=g) * 3, torch.randint(0, VOCAB, (N,), generator=g)


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
@pytest.mark.parametrize(("bias", "config", "scale"), [
    (False, {}, 1.0),
    (True, {}, 1.0),
    (False, {"logits_scaling": 4.0}, 0.25),
    (True, {"logit_scale": 0.5}, 0.5),
])  # fmt: skip
def test_fused_loss_and_gradients_equal_the_plain_ones(monkeypatch, chunk_rows, bias, config, scale):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", chunk_rows * VOCAB)
    torch.manual_seed(0)
    fused_lm = _LM(bias, **config)
    plain_lm = _LM(bias, **config)
    plain_lm.load_state_dict(fused_lm.state_dict())
    hidden, targets = _inputs(1)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()

    loss, correct = head_loss(fused_lm, h1, targets)
    ref_loss, ref_correct = _reference(plain_lm, h2, targets, scale)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert int(correct) == int(ref_correct)
    (loss * 0.3).backward()  # a non-unit upstream gradient is carried through
    (ref_loss * 0.3).backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)
    assert torch.allclose(fused_lm.head.weight.grad, plain_lm.head.weight.grad, atol=1e-5, rtol=1e-4)
    if bias:
        assert torch.allclose(fused_lm.head.bias.grad, plain_lm.head.bias.grad, atol=1e-5, rtol=1e-4)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    lm = _LM(False)
    lm.head.weight.requires_grad_(False)
    hidden, targets = _inputs(2)
    h = hidden.clone().requires_grad_()
    loss, _ = head_loss(lm, h, targets)
    loss.backward()
    assert lm.head.weight.grad is None
    ref = hidden.clone().requires_grad_()
    _reference(lm, ref, targets, 1.0)[0].backward()
    assert torch.allclose(h.grad, ref.grad, atol=1e-5, rtol=1e-4)


def test_evaluation_without_grad_gives_the_same_sums():
    lm = _LM(True)
    hidden, targets = _inputs(3)
    with torch.no_grad():
        loss, correct = head_loss(lm, hidden, targets)
        ref_loss, ref_correct = _reference(lm, hidden, targets, 1.0)
    assert not loss.requires_grad
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert int(correct) == int(ref_correct)


def test_a_soft_capped_head_takes_the_plain_path_with_the_same_result():
    lm = _LM(False, final_logit_softcapping=5.0)
    hidden, targets = _inputs(4)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss, correct = head_loss(lm, h1, targets)
    ref_loss, ref_correct = _reference(lm, h2, targets, 1.0, cap=5.0)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert int(correct) == int(ref_correct)
    loss.backward()
    ref_loss.backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_under_cpu_bf16_autocast_the_fused_loss_matches_the_plain_one_within_bf16_precision(monkeypatch, bias):
    """The recipe runs the head loss inside torch.autocast("cpu", bfloat16) (spec.dtype bf16): the head's matmuls
    run in bf16 there, the sums and gradients stay fp32 and agree with autograd's under the same autocast."""
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 7 * VOCAB)
    torch.manual_seed(0)
    fused_lm, plain_lm = _LM(bias), _LM(bias)
    plain_lm.load_state_dict(fused_lm.state_dict())
    hidden, targets = _inputs(5)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, correct = head_loss(fused_lm, h1, targets)
        ref_loss, ref_correct = _reference(plain_lm, h2, targets, 1.0)
        assert F.linear(hidden, fused_lm.head.weight).dtype == torch.bfloat16  # autocast is really on
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-2)
    assert abs(int(correct) - int(ref_correct)) <= 2  # near-ties may flip in bf16
    loss.backward()
    ref_loss.backward()
    for mine, ref in [(h1.grad, h2.grad), (fused_lm.head.weight.grad, plain_lm.head.weight.grad)] + (
        [(fused_lm.head.bias.grad, plain_lm.head.bias.grad)] if bias else []
    ):
        assert mine.dtype == torch.float32
        assert torch.allclose(mine, ref.float(), atol=2e-2 * float(ref.abs().max()), rtol=2e-2)
