"""The causal-LM loss computed where it counts: the decoder runs on the whole batch, but the output head only
on the positions that have a trained target, so a 49k-vocabulary model never materialises logits for
prompt, masked or padding tokens. Knows a transformers causal LM (plain or wrapped by peft), nothing else.

For a plain linear head (optionally scaled) the head and the cross-entropy are fused and chunked: each chunk of
positions computes its logits, its loss and, in the same pass, its gradient, so the full (positions x vocab)
logits, their softmax and their gradient never exist at once (three fp32 copies, about 0.6 MB per trained token
at a 49k vocabulary) and the softmax is not recomputed in the backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tuneforge.data.tokenization.examples import IGNORE

# Logits computed at once: chunk rows x vocabulary stays under this many elements (128 MB in fp32).
CHUNK_ELEMENTS = 1 << 25


def causal_lm(model: Any) -> Any:
    """The transformers `*ForCausalLM` inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def head_logits(lm: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states, with the output scalings some architectures apply, in fp32."""
    logits = lm.get_output_embeddings()(hidden).float()
    cfg = lm.config
    if getattr(cfg, "logits_scaling", None):  # granite divides
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "logit_scale", None):  # cohere multiplies
        logits = logits * cfg.logit_scale
    cap = getattr(cfg, "final_logit_softcapping", None)  # gemma 2
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _linear_head(lm: Any) -> tuple[torch.nn.Linear, float] | None:
    """The head as (linear layer, logit scale) when the fused loss applies: a plain nn.Linear, no soft-capping."""
    head = lm.get_output_embeddings()
    cfg = lm.config
    if type(head) is not torch.nn.Linear or getattr(cfg, "final_logit_softcapping", None):
        return None
    scale = 1.0
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "logit_scale", None):
        scale *= float(cfg.logit_scale)
    return head, scale


class _FusedHeadLoss(torch.autograd.Function):
    """sum_i CE(scale * (W h_i + b), t_i) and the number of argmax hits, with the gradients made in the forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        n, vocab = hidden.shape[0], weight.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        want_b = bias is not None and ctx.needs_input_grad[3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        step = max(1, CHUNK_ELEMENTS // max(1, vocab))
        for start in range(0, n, step):
            h, t = hidden[start : start + step], targets[start : start + step]
            logits = F.linear(h, weight, bias).float()
            if scale != 1.0:
                logits.mul_(scale)
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            correct += (logits.argmax(dim=-1) == t).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            # d loss / d logits = softmax - one_hot, made in place in the logits' buffer.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            if scale != 1.0:
                grad.mul_(scale)
            if grad_h is not None:
                grad_h[start : start + step] = grad.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(grad.t(), h.float())
            if grad_b is not None:
                grad_b += grad.sum(dim=0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.which = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_correct: Any) -> tuple[Any, ...]:
        saved = iter(ctx.saved_tensors)
        has_h, has_w, has_b = ctx.which
        grad_h = next(saved) * grad_loss.to(ctx.dtypes[0]) if has_h else None
        grad_w = (next(saved) * grad_loss).to(ctx.dtypes[1]) if has_w else None
        grad_b = (next(saved) * grad_loss).to(ctx.dtypes[1]) if has_b else None
        return grad_h, None, grad_w, grad_b, None


def head_loss(lm: Any, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, argmax hits) of the head over `hidden` (positions x hidden) against `targets`."""
    fused = _linear_head(lm)
    if fused is None:
        logits = head_logits(lm, hidden)
        return F.cross_entropy(logits, targets, reduction="sum"), (logits.detach().argmax(dim=-1) == targets).sum()
    head, scale = fused
    weight: torch.Tensor = head.weight
    bias: torch.Tensor | None = head.bias
    if weight.dtype != hidden.dtype:  # autocast: the head runs in the activations' precision
        hidden = hidden.to(weight.dtype)
    if not torch.is_grad_enabled():  # evaluation: the same sums, no gradients made
        with torch.no_grad():
            hidden, weight = hidden.detach(), weight.detach()
            bias = bias.detach() if bias is not None else None
    loss, correct = _FusedHeadLoss.apply(hidden, targets, weight, bias, scale)
    return loss, correct


def trained_token_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed cross-entropy over the batch's trained targets, the number of them predicted right, and their count.

    Args:
        model: a causal LM, plain or peft-wrapped (LoRA layers live inside the decoder, so calling it directly
            trains them too).
        batch: `input_ids`, `position_ids`, `targets` as made by `batching.collate`, on the model's device.

    Returns:
        (loss sum, a scalar tensor with grad; correct predictions, a scalar tensor; trained target count).
    """
    lm = causal_lm(model)
    out = lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return trained_positions_loss(lm, out.last_hidden_state, batch["targets"])


def trained_positions_loss(
    lm: Any, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The head and its loss over the positions of `hidden` [B, T, H] whose `targets` [B, T] are trained:
    (loss sum, correct predictions, trained target count)."""
    where = targets != IGNORE
    wanted = targets[where]
    loss_sum, correct = head_loss(lm, hidden[where], wanted)
    return loss_sum, correct, int(wanted.numel())
