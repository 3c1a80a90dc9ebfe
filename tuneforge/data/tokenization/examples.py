"""A tokenized training example, the report of a tokenization run with its drop reasons, and the cut to
`max_seq_length` that keeps or drops an example; `IGNORE` is the label of a token that is not trained.

Shared by every tokenizer of this package (SFT formats, pre-tokenized parquet, preference pairs) and by packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

IGNORE = -100  # the label of a token that is not trained (the loss's ignore_index, as in Hugging Face)

# Drop reasons (keys of `TokenizationReport.dropped_reasons`).
EMPTY = "empty"
NO_TRAINED = "no_trained_tokens"
NO_TRAINED_AFTER_TRUNCATION = "no_trained_tokens_after_truncation"
MALFORMED = "malformed"  # a record that does not have its format's shape (the validator should have refused it)
IMAGES = "images"  # image parts: a text tokenizer cannot render them
IMAGES_CUT = "images_cut"  # the cut at max_seq_length would go through an image, which the model needs whole


@dataclass
class TokenizedExample:
    """One training sequence. `labels` is as long as `input_ids`; IGNORE (-100) marks a token that is not trained.

    `position_ids` is set only for pre-tokenized rows that brought their own; where it restarts at 0 a new
    sequence begins (packing keeps those sequences apart). `images` holds the data URLs of the images a
    vision-language example shows, in order (its `input_ids` hold the tokens its processor expanded them to).
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    position_ids: list[int] | None = None
    images: tuple[str, ...] = ()

    @property
    def num_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


@dataclass
class TokenizationReport:
    """What tokenizing a dataset gave. Token counts cover the kept examples; `truncated` counts kept examples that
    were cut at `max_seq_length` (those dropped after the cut are under `dropped_reasons`)."""

    examples: int = 0
    trained_tokens: int = 0
    masked_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    format: str = ""
    # The last example dropped for having no trained token, as cut: a preview shows it (it is not in `to_dict`).
    last_untrained: TokenizedExample | None = field(default=None, repr=False, compare=False)

    def trained_share(self) -> float:
        """trained / (trained + masked), 0.0 when there are no tokens."""
        total = self.trained_tokens + self.masked_tokens
        return self.trained_tokens / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "last_untrained"}
        out["dropped_reasons"] = dict(sorted(self.dropped_reasons.items()))
        out["trained_share"] = round(self.trained_share(), 6)
        return out

    def drop(self, reason: str) -> None:
        self.dropped += 1
        self.dropped_reasons[reason] = self.dropped_reasons.get(reason, 0) + 1

    def keep(self, example: TokenizedExample, out: list[TokenizedExample]) -> None:
        trained = example.num_trained
        self.examples += 1
        self.trained_tokens += trained
        self.masked_tokens += len(example.input_ids) - trained
        self.truncated += example.truncated
        out.append(example)


def finish(
    ids: list[int], labels: list[int], max_seq_length: int, report: TokenizationReport, out: list[TokenizedExample],
    images: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """Truncate (keeping the start), then keep the example (with its `images`) or count why it is dropped."""
    if not ids:
        report.drop(EMPTY)
        return
    if labels[0] != IGNORE:
        labels = [IGNORE, *labels[1:]]  # nothing predicts the first token
    truncated = len(ids) > max_seq_length
    if labels.count(IGNORE) == len(labels):
        report.drop(NO_TRAINED)
        report.last_untrained = TokenizedExample(ids[:max_seq_length], labels[:max_seq_length], truncated)
        return
    if truncated:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if labels.count(IGNORE) == len(labels):
            report.drop(NO_TRAINED_AFTER_TRUNCATION)
            report.last_untrained = TokenizedExample(ids, labels, truncated)
            return
    report.keep(TokenizedExample(ids, labels, truncated, images=images), out)
