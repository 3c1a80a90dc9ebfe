"""Sample packing: tokenized examples -> rows of at most `max_seq_length` tokens, best-fit decreasing.

A row records the lengths of the sequences packed into it (`seq_lens`), from which the recipe builds position ids
restarting at 0 and a block-diagonal causal mask, so packed examples never attend to each other. Plain lists only:
knows nothing of torch, tokenizers or dataset formats.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass

from tuneforge.data.tokenization.examples import IGNORE, TokenizedExample


@dataclass
class PackedRow:
    """One packed training row. `seq_lens` are the lengths of its sequences in order; they sum to len(input_ids).

    The label of every sequence's first token is IGNORE, so no token is predicted across a sequence boundary.
    """

    input_ids: list[int]
    labels: list[int]
    seq_lens: list[int]


def pack_examples(
    examples: Sequence[TokenizedExample], *, max_seq_length: int, seed: int | None = None
) -> list[PackedRow]:
    """Pack examples into as few rows as best-fit decreasing finds, never splitting an example.

    Longest examples are placed first, each into the open row with the least room that still fits it. Equal
    lengths are taken in example order, or in an order shuffled by `seed`; with a seed the rows are also shuffled.
    The same input and seed always give the same rows. An example with its own `position_ids` (pre-tokenized
    data) is one unit, but each run of its positions that restarts at 0 counts as a sequence in `seq_lens`.

    Args:
        examples: tokenized examples, each 1..max_seq_length tokens long.
        max_seq_length: the most tokens in a row.
        seed: None keeps example order among ties and the rows in the order they were opened.

    Returns:
        The rows; every example appears in exactly one of them.

    Raises:
        ValueError: an example is empty, longer than `max_seq_length`, or has labels of another length.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be at least 1, got {max_seq_length}")
    lengths = [len(e.input_ids) for e in examples]
    for k, (example, n) in enumerate(zip(examples, lengths, strict=True)):
        if not 1 <= n <= max_seq_length:
            raise ValueError(f"example {k} has {n} tokens; packing takes 1..{max_seq_length}")
        if len(example.labels) != n:
            raise ValueError(f"example {k} has {n} input_ids but {len(example.labels)} labels")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if seed is not None:
        rng.shuffle(order)
    order.sort(key=lambda k: -lengths[k])  # stable: ties keep the (shuffled) order
    bins = _best_fit(order, lengths, max_seq_length)
    rows = [_row([examples[k] for k in members]) for members in bins]
    if seed is not None:
        rng.shuffle(rows)
    return rows


def _best_fit(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices. Open bins are kept by their room left, so each placement is a bisect."""
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> bins with exactly that room (a stack)
    rooms: list[int] = []  # the keys of by_room, sorted
    for k in order:
        need = lengths[k]
        p = bisect_left(rooms, need)
        if p < len(rooms):
            room = rooms[p]
            stack = by_room[room]
            b = stack.pop()
            if not stack:
                del by_room[room]
                rooms.pop(p)
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(k)
        room -= need
        if room > 0:
            if room not in by_room:
                by_room[room] = []
                insort(rooms, room)
            by_room[room].append(b)
    return bins


def _row(members: list[TokenizedExample]) -> PackedRow:
    ids: list[int] = []
    labels: list[int] = []
    seq_lens: list[int] = []
    for example in members:
        start = len(ids)
        ids.extend(example.input_ids)
        labels.extend(example.labels)
        for length in _sequence_lengths(example):
            labels[start] = IGNORE
            seq_lens.append(length)
            start += length
    return PackedRow(ids, labels, seq_lens)


def _sequence_lengths(example: TokenizedExample) -> list[int]:
    """[len] for an ordinary example; the runs between restarts at 0 for one with its own position ids."""
    pos = example.position_ids
    n = len(example.input_ids)
    if pos is None or len(pos) != n:
        return [n]
    starts = [0] + [j for j in range(1, n) if pos[j] == 0]
    return [b - a for a, b in zip(starts, [*starts[1:], n], strict=True)]
