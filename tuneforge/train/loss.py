"""The causal-LM loss computed where it counts: the decoder runs on the whole batch, but the output head only
on the positions that have a trained target, so a 49k-vocabulary model never materialises logits for
prompt, masked or padding tokens. Knows a transformers causal LM (plain or wrapped by peft), nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tuneforge.train.batching import IGNORE


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
    targets = batch["targets"]
    where = targets != IGNORE
    hidden = out.last_hidden_state[where]
    wanted = targets[where]
    logits = head_logits(lm, hidden)
    loss_sum = F.cross_entropy(logits, wanted, reduction="sum")
    correct = (logits.detach().argmax(dim=-1) == wanted).sum()
    return loss_sum, correct, int(wanted.numel())
