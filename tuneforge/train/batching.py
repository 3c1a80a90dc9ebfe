"""Rows, batches and the data order of a run: tokenized examples (or packed rows) become next-token targets,
an epoch becomes a seeded list of micro-batches (length-bucketed when not packed), a micro-batch becomes
right-padded tensors. Knows no model: token ids in, tensors out.

A row's `targets[t]` is the token position t must predict (labels shifted left by one), -100 where nothing is
trained; a packed row never predicts across its examples' borders, so a packed batch has exactly the loss of
its examples run one by one (with position ids restarting per example, which tells the model where they end).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneforge.data.tokenization.examples import IGNORE


@dataclass(frozen=True, slots=True)
class Row:
    """One training row: a single example or several packed ones (`seq_lens`, summing to len(input_ids))."""

    input_ids: np.ndarray  # int32
    targets: np.ndarray  # int32, next-token targets, IGNORE where not trained
    seq_lens: tuple[int, ...]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def trained(self) -> int:
        return int((self.targets != IGNORE).sum())


def shifted_targets(labels: Sequence[int], seq_lens: Sequence[int]) -> np.ndarray:
    """Next-token targets for labels in the Hugging Face layout (aligned with input_ids, -100 = masked).

    Position t predicts labels[t+1]; the last position of every example predicts nothing, so packed examples
    never learn from each other.
    """
    lab = np.asarray(labels, dtype=np.int32)
    out = np.full(lab.shape[0], IGNORE, dtype=np.int32)
    if lab.shape[0] > 1:
        out[:-1] = lab[1:]
    ends = np.cumsum(np.asarray(seq_lens, dtype=np.int64)) - 1
    out[ends[ends < lab.shape[0]]] = IGNORE
    return out


def make_row(input_ids: Sequence[int], labels: Sequence[int], seq_lens: Sequence[int] | None = None) -> Row:
    """A Row from token ids and aligned labels; `seq_lens` of packed examples (default: one example)."""
    lens = tuple(int(n) for n in seq_lens) if seq_lens else (len(input_ids),)
    return Row(np.asarray(input_ids, dtype=np.int32), shifted_targets(labels, lens), lens)


def example_row(example: Any) -> Row:
    """A Row from a `TokenizedExample`; one that brought its own position ids is split where they restart."""
    n = len(example.input_ids)
    pos = getattr(example, "position_ids", None)
    if pos is None or len(pos) != n:
        return make_row(example.input_ids, example.labels)
    starts = [0] + [j for j in range(1, n) if pos[j] == 0]
    return make_row(example.input_ids, example.labels, [b - a for a, b in zip(starts, [*starts[1:], n], strict=True)])


def packed_row(row: Any) -> Row:
    """A Row from a `PackedRow` (input_ids, labels, seq_lens)."""
    return make_row(row.input_ids, row.labels, row.seq_lens)


def position_ids(seq_lens: Sequence[int], length: int) -> np.ndarray:
    """Positions restarting at 0 for each example; padding after the last one continues its count."""
    parts = [np.arange(n, dtype=np.int64) for n in seq_lens]
    used = int(sum(seq_lens))
    if length > used:
        start = int(seq_lens[-1]) if seq_lens else 0
        parts.append(np.arange(start, start + length - used, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors `input_ids`, `position_ids`, `targets` (B, longest row), all int64.

    No attention mask: under causal attention, right padding is never seen by real tokens, and position ids
    that restart mark packed examples (the model then builds the block-diagonal mask itself).
    """
    import torch

    width = max(r.length for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    tgt = np.full((len(rows), width), IGNORE, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : r.length] = r.input_ids
        tgt[i, : r.length] = r.targets
        pos[i] = position_ids(r.seq_lens, width)
    return {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(pos),
        "targets": torch.from_numpy(tgt),
    }


def plan_epoch(lengths: Sequence[int], *, rows_per_batch: int, seed: int, epoch: int, bucket: bool) -> list[list[int]]:
    """The micro-batches (lists of row indices) of one epoch, a pure function of its arguments.

    Rows are shuffled with a generator seeded by (seed, epoch). With `bucket`, each window of 64 batches is
    sorted by length before it is cut, so a batch pads little, and the batches are shuffled again.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    size = max(1, rows_per_batch)
    if not bucket:
        return [order[i : i + size] for i in range(0, len(order), size)]
    span = size * 64
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        window = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches.extend(window[i : i + size] for i in range(0, len(window), size))
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def group_steps(batches: list[list[int]], accumulation: int) -> list[list[list[int]]]:
    """Optimizer steps: consecutive groups of `accumulation` micro-batches (the last group may be shorter)."""
    n = max(1, accumulation)
    return [batches[i : i + n] for i in range(0, len(batches), n)]


def split_by_tokens(indices: Sequence[int], lengths: Sequence[int], budget_tokens: int) -> list[list[int]]:
    """Cut a micro-batch into chunks whose padded size (rows x longest) stays within `budget_tokens`.

    At least one row per chunk. Gradients of the chunks add up to the micro-batch's, so this bounds memory
    without changing the arithmetic.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in sorted(indices, key=lambda j: lengths[j]):
        grown = max(longest, lengths[i])
        if current and grown * (len(current) + 1) > budget_tokens:
            chunks.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        chunks.append(current)
    return chunks


def steps_per_epoch(n_rows: int, rows_per_batch: int, accumulation: int) -> int:
    batches = -(-n_rows // max(1, rows_per_batch))
    return -(-batches // max(1, accumulation))


def count_tokens(rows: Iterable[Row]) -> tuple[int, int]:
    """(real tokens, trained targets) over rows."""
    total = trained = 0
    for r in rows:
        total += r.length
        trained += r.trained
    return total, trained
