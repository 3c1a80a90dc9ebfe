"""Rows, steps and the data order of a run: tokenized examples become next-token targets, an epoch becomes a
seeded list of optimizer steps of `batch_size` examples each, a step's examples become rows (packed or one example
each), and rows become right-padded tensors. Knows no model: token ids in, tensors out.

A row's `targets[t]` is the token position t must predict (labels shifted left by one), -100 where nothing is
trained; a packed row never predicts across its examples' borders, so a packed row has exactly the loss of its
examples run one by one (with position ids restarting per example, which tells the model where they end). Packing
therefore only changes how a step's examples are laid into rows, never which examples a step trains on.
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


def plan_epoch(n_examples: int, *, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The optimizer steps of one epoch (lists of example indices), a pure function of its arguments.

    The examples are shuffled by a generator seeded by (seed, epoch) and cut into steps of `batch_size` examples;
    the last step may be shorter. Packing plays no part: a packed and an unpacked run train on the same steps.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_examples).tolist()
    size = max(1, batch_size)
    return [order[i : i + size] for i in range(0, len(order), size)]


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """ceil(examples / batch_size): what `plan_epoch` gives, whatever packing and gradient accumulation are."""
    return -(-n_examples // max(1, batch_size))


def micro_batches(step: Sequence[int], accumulation: int) -> list[list[int]]:
    """A step's examples in `accumulation` consecutive parts of near-equal size (fewer when the step is smaller).

    Memory only: the loss of a step is normalised over all of its trained tokens, so the parts add up to it.
    """
    n = min(max(1, accumulation), max(1, len(step)))
    size, extra = divmod(len(step), n)
    parts: list[list[int]] = []
    start = 0
    for k in range(n):
        end = start + size + (1 if k < extra else 0)
        parts.append(list(step[start:end]))
        start = end
    return [p for p in parts if p]


def concat_rows(rows: Sequence[Row]) -> Row:
    """One packed row of `rows` in order: their targets already end each example, so nothing crosses a border."""
    if len(rows) == 1:
        return rows[0]
    return Row(
        np.concatenate([r.input_ids for r in rows]),
        np.concatenate([r.targets for r in rows]),
        tuple(n for r in rows for n in r.seq_lens),
    )


def pack_rows(rows: Sequence[Row], capacity: int) -> list[Row]:
    """Rows packed first-fit decreasing into rows of at most `capacity` tokens (a longer row stays alone).

    Deterministic: ties in length keep their order in `rows`.
    """
    order = sorted(range(len(rows)), key=lambda i: -rows[i].length)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        need = rows[i].length
        for b, left in enumerate(room):
            if need <= left:
                bins[b].append(i)
                room[b] -= need
                break
        else:
            bins.append([i])
            room.append(capacity - need)
    return [concat_rows([rows[i] for i in members]) for members in bins]


def lay_out(rows: Sequence[Row], pack_to: int | None) -> list[Row]:
    """A step's (or micro-batch's) examples as the rows to forward: packed into rows of up to `pack_to` tokens,
    or (None) one row per example, in `longest_first` order so that chunks pad little."""
    if pack_to is not None:
        return pack_rows(rows, pack_to)
    return [rows[i] for i in longest_first(rows)]


def longest_first(rows: Sequence[Row]) -> list[int]:
    """The order of unpacked rows in `lay_out`: longest first, ties in their given order."""
    return sorted(range(len(rows)), key=lambda i: -rows[i].length)


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


def count_tokens(rows: Iterable[Row]) -> tuple[int, int]:
    """(real tokens, trained targets) over rows."""
    total = trained = 0
    for r in rows:
        total += r.length
        trained += r.trained
    return total, trained
