"""The SFT loss is exact: packed rows give the loss of their examples run one by one (llama, qwen2, qwen3 on sdpa),
masked tokens never count, and computing logits only at trained positions equals the full-logits loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tuneforge.data.tokenization.examples import IGNORE
from tuneforge.train.batching import collate, make_row, shifted_targets
from tuneforge.train.loss import trained_token_loss
from tuneforge.train.tiny_models import make_tiny_model

VOCAB = 384
LENGTHS = (17, 33, 9, 25)


def _model(arch: str):
    model = make_tiny_model(arch, VOCAB, seed=1)
    assert model.config._attn_implementation == "sdpa"
    return model


def _examples(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Token ids and HF-layout labels: a masked prompt of random length, then trained answer tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        ids = rng.integers(4, VOCAB, size=n).tolist()
        prompt = int(rng.integers(1, n - 2))
        labels = [IGNORE] * prompt + ids[prompt:]
        out.append((ids, labels))
    return out


def _one_by_one(model, examples) -> tuple[float, int, int]:
    loss, correct, count = 0.0, 0, 0
    for ids, labels in examples:
        s, c, n = trained_token_loss(model, collate([make_row(ids, labels)], pad_id=3))
        loss, correct, count = loss + float(s), correct + int(c), count + n
    return loss, correct, count


def _packed(examples) -> tuple[list[int], list[int], list[int]]:
    ids = [t for e in examples for t in e[0]]
    labels = [t for e in examples for t in e[1]]
    return ids, labels, [len(e[0]) for e in examples]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@torch.no_grad()
def test_a_packed_row_has_the_loss_of_its_examples_alone(arch):
    model = _model(arch)
    examples = _examples()
    want_loss, want_correct, want_count = _one_by_one(model, examples)
    got_loss, got_correct, got_count = trained_token_loss(model, collate([make_row(*_packed(examples))], pad_id=3))
    assert got_count == want_count
    assert float(got_loss) == pytest.approx(want_loss, rel=1e-5)
    assert int(got_correct) == want_correct


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_padded_batches_of_packed_rows_are_exact_too(arch):
    model = _model(arch)
    examples = _examples(seed=3)
    rows = [make_row(*_packed(examples[:2])), make_row(*_packed(examples[2:]))]  # different lengths: one is padded
    want_loss, _, want_count = _one_by_one(model, examples)
    got_loss, _, got_count = trained_token_loss(model, collate(rows, pad_id=3))
    assert got_count == want_count
    assert float(got_loss) == pytest.approx(want_loss, rel=1e-5)


def test_without_restarting_positions_packing_would_leak():
    """The control: the same packed tokens read as one sequence give another loss (so the test above can fail)."""
    model = _model("llama")
    examples = _examples()
    ids, labels, lens = _packed(examples)
    with torch.no_grad():
        exact, _, _ = trained_token_loss(model, collate([make_row(ids, labels, lens)], pad_id=3))
        batch = collate([make_row(ids, labels, lens)], pad_id=3)
        batch["position_ids"] = torch.arange(len(ids))[None]
        leaky, _, _ = trained_token_loss(model, batch)
    assert abs(float(leaky) - float(exact)) > 1e-3


def test_trained_positions_loss_equals_the_full_logits_loss_and_its_gradients():
    examples = _examples(seed=5)[:2]
    model_a, model_b = _model("llama"), _model("llama")
    rows = [make_row(ids, labels) for ids, labels in examples]
    batch = collate(rows, pad_id=3)
    loss_sum, _, n = trained_token_loss(model_a, batch)
    (loss_sum / n).backward()

    width = batch["input_ids"].shape[1]
    labels = torch.full((2, width), IGNORE)
    for i, (_, lab) in enumerate(examples):
        labels[i, : len(lab)] = torch.tensor(lab)
    reference = model_b(input_ids=batch["input_ids"], labels=labels, use_cache=False).loss  # HF: full logits, shifts
    reference.backward()
    assert float(loss_sum.detach() / n) == pytest.approx(float(reference.detach()), rel=1e-5)
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


@torch.no_grad()
def test_masked_tokens_never_count():
    model = _model("llama")
    ids, labels = _examples(seed=7)[1]
    row = make_row(ids, labels)
    loss_sum, _, n = trained_token_loss(model, collate([row], pad_id=3))
    # By hand: the log-probabilities of the trained answer tokens only, from full logits.
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    logp = F.log_softmax(logits[:-1], dim=-1)
    wanted = [(t, labels[t + 1]) for t in range(len(ids) - 1) if labels[t + 1] != IGNORE]
    by_hand = -sum(float(logp[t, y]) for t, y in wanted)
    assert n == len(wanted)
    assert float(loss_sum) == pytest.approx(by_hand, rel=1e-5)
    # Masking more of the prompt's labels changes nothing the model is trained on...
    first_trained = next(i for i, t in enumerate(labels) if t != IGNORE)
    other = make_row(ids, [IGNORE] * first_trained + labels[first_trained:])
    assert float(trained_token_loss(model, collate([other], pad_id=3))[0]) == pytest.approx(float(loss_sum))
    # ...and an all-masked row contributes nothing at all.
    empty = make_row(ids, [IGNORE] * len(ids))
    s, _, k = trained_token_loss(model, collate([empty], pad_id=3))
    assert k == 0 and float(s) == 0.0


def test_targets_never_cross_a_packed_border():
    labels = [IGNORE, 5, 6, IGNORE, 8, 9]
    targets = shifted_targets(labels, [3, 3])
    assert targets.tolist() == [5, 6, IGNORE, 8, 9, IGNORE]
