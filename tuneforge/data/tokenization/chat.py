"""Chat rendering for training and serving: messages -> the chat template's token ids, and which of them are trained.

The tokens are exactly what `tokenizer.apply_chat_template` gives for the whole conversation, so a served prompt
renders the same way. Trained spans are found template-agnostically, from renderings of conversation prefixes
(token differences first, character offsets second). Also the 3.10 preview row. Knows nothing of files, dataset
formats other than `messages`, torch or transformers (the tokenizer is duck-typed, see `tokenizer.py`).
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Any

from tuneforge.data.tokenization.examples import IGNORE
from tuneforge.data.tokenization.tokenizer import Tokenizer, as_ids, encode, encode_with_offsets


class ImageContent(ValueError):
    """A message holds image parts, which a text tokenizer cannot render."""


class TemplateMismatch(ValueError):
    """The chat template renders a conversation prefix differently from the start of the whole conversation."""


def normalize_messages(messages: Sequence[dict[str, Any]], *, keep_parts: bool = False) -> list[dict[str, Any]]:
    """Messages as chat templates expect them; training and serving both render through this.

    - `content` missing or null becomes `""` (an assistant turn that only calls tools);
    - a list of text parts becomes one string, the parts joined by newlines, unless `keep_parts` (a tokenizer
      that takes images, `vision.VisionTokenizer`, renders the parts itself);
    - `reasoning` and `reasoning_content` are both set when either is (templates read one or the other);
    - a tool call's `arguments` JSON text becomes the object it holds, as HF tool templates expect
      (text that is not a JSON object stays text).

    Raises:
        ImageContent: a message holds an `image_url` part and not `keep_parts`.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        m = dict(message)
        content = m.get("content")
        if content is None:
            m["content"] = ""
        elif isinstance(content, list) and not keep_parts:
            m["content"] = _join_text_parts(content)
        for key, other in (("reasoning", "reasoning_content"), ("reasoning_content", "reasoning")):
            if isinstance(m.get(key), str) and other not in m:
                m[other] = m[key]
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [_parsed_call(call) for call in m["tool_calls"]]
        out.append(m)
    return out


def takes_images(tokenizer: Any) -> bool:
    """Whether `tokenizer` renders image parts itself (a model's processor, `vision.VisionTokenizer`)."""
    return bool(getattr(tokenizer, "takes_images", False))


def _join_text_parts(parts: list[Any]) -> str:
    texts = []
    for part in parts:
        if isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif isinstance(part, dict) and part.get("type") == "image_url":
            raise ImageContent("the conversation holds images; a text tokenizer cannot render them")
    return "\n".join(texts)


def _parsed_call(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    args = call["function"].get("arguments")
    if not isinstance(args, str):
        return call
    try:
        value = json.loads(args)
    except ValueError:
        return call
    if not isinstance(value, dict):
        return call
    return {**call, "function": {**call["function"], "arguments": value}}


class _Renderer:
    """Renders prefixes of one conversation, each at most once; `n` messages, `gen` adds the generation prompt."""

    def __init__(self, tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[Any] | None) -> None:
        self.tokenizer, self.messages, self.tools = tokenizer, messages, tools or None
        self._ids: dict[tuple[int, bool], list[int]] = {}
        self._text: dict[tuple[int, bool], str] = {}

    def ids(self, n: int, gen: bool) -> list[int]:
        key = (n, gen)
        if key not in self._ids:
            out = self._call(n, gen, tokenize=True)
            self._ids[key] = as_ids(out)
        return self._ids[key]

    def text(self, n: int, gen: bool) -> str:
        key = (n, gen)
        if key not in self._text:
            out = self._call(n, gen, tokenize=False)
            if not isinstance(out, str):
                raise ValueError(f"apply_chat_template(tokenize=False) returned {type(out).__name__}, not text")
            self._text[key] = out
        return self._text[key]

    def _call(self, n: int, gen: bool, *, tokenize: bool) -> Any:
        what = f"messages[:{n}]" + (" with the generation prompt" if gen else "")
        try:
            return self.tokenizer.apply_chat_template(
                self.messages[:n], tools=self.tools, tokenize=tokenize, add_generation_prompt=gen
            )
        except Exception as exc:  # jinja2 raises TemplateError and its subclasses, templates raise anything
            raise TemplateMismatch(f"the chat template failed on {what}: {exc}") from exc


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _boundary(r: _Renderer, full: Sequence[Any], n: int, gen: bool, *, text: bool) -> int:
    """Where messages[:n] (plus the generation prompt when `gen`) ends inside the whole rendering `full`.

    A plain prefix must be an exact prefix. With the generation prompt the boundary is where the prompt stops
    agreeing with the full rendering, so a template whose generation prompt differs from its rendered turns
    (e.g. one that opens a `<think>` block only when generating) still works; it never lies before the plain prefix.
    """
    total = len(r.messages)
    if n >= total and not gen:
        return len(full)
    if n == 0:
        return 0  # nothing can be rendered; the whole conversation starts here
    rendered: Sequence[Any] = r.text(n, gen) if text else r.ids(n, gen)
    if not gen:
        if len(rendered) > len(full) or full[: len(rendered)] != rendered:
            raise TemplateMismatch(f"the rendering of messages[:{n}] is not a prefix of the whole conversation's")
        return len(rendered)
    agreed = _common_prefix(rendered, full)
    if agreed == len(rendered):
        return agreed
    plain = _boundary(r, full, n, False, text=text)
    if agreed < plain:
        raise TemplateMismatch(
            f"the rendering of messages[:{n}] with the generation prompt departs from the whole conversation's"
        )
    return agreed


# A region: (first message index, generation-prompt start?, trained?). It runs from the start of message i (after
# its generation prompt when the flag is set) to the start of message i+1.
Region = tuple[int, bool, bool]


def _regions(messages: list[dict[str, Any]], train_on_inputs: bool) -> list[Region]:
    regions: list[Region] = []
    for i, m in enumerate(messages):
        weighted_out = m.get("weight") == 0
        if train_on_inputs:
            if weighted_out:
                regions.append((i, False, False))
        elif m.get("role") == "assistant" and not weighted_out:
            regions.append((i, True, True))
    return regions


def conversation_tokens(
    messages: Sequence[dict[str, Any]],
    tools: list[Any] | None,
    tokenizer: Tokenizer,
    *,
    train_on_inputs: bool,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation.

    Args:
        messages: the record's `messages` (validated; normalized here).
        tools: the record's `tools`, or None.
        tokenizer: a tokenizer with a chat template.
        train_on_inputs: False trains only the assistant turns (content, tool calls and reasoning as rendered,
            up to and including the end-of-turn token; the template's whitespace after it is not trained);
            True trains every token. Either way a message with `weight` 0 is not trained.

    Returns:
        (input_ids, labels), labels IGNORE where not trained; the first label is always IGNORE (nothing predicts
        the first token).

    Raises:
        ImageContent: a message holds images.
        TemplateMismatch: the template fails, or its prefixes do not line up with the whole rendering in tokens
            nor in characters.
    """
    msgs = normalize_messages(messages, keep_parts=takes_images(tokenizer))
    r = _Renderer(tokenizer, msgs, tools)
    ids = r.ids(len(msgs), False)
    regions = _regions(msgs, train_on_inputs)
    try:
        spans = _locate(r, ids, regions, text=False)
    except TemplateMismatch as token_problem:
        spans = _spans_by_characters(r, ids, regions, token_problem)
    labels = list(ids) if train_on_inputs else [IGNORE] * len(ids)
    eos = tokenizer.eos_token_id
    for start, end, trained in spans:
        if trained:
            end = _through_last(ids, start, end, eos)
            labels[start:end] = ids[start:end]
        else:
            labels[start:end] = [IGNORE] * (end - start)
    if labels:
        labels[0] = IGNORE
    return ids, labels


def _locate(r: _Renderer, full: Sequence[Any], regions: list[Region], *, text: bool) -> list[tuple[int, int, bool]]:
    """Each region as (start, end, trained) positions in `full`: token indices, or characters when `text`."""
    return [
        (_boundary(r, full, i, gen, text=text), _boundary(r, full, i + 1, False, text=text), trained)
        for i, gen, trained in regions
    ]


def _spans_by_characters(
    r: _Renderer, ids: list[int], regions: list[Region], token_problem: TemplateMismatch
) -> list[tuple[int, int, bool]]:
    """The regions located in the rendered text, then mapped onto the tokens that overlap them."""
    try:
        full = r.text(len(r.messages), False)
        chars = _locate(r, full, regions, text=True)
        got, offsets = encode_with_offsets(r.tokenizer, full)
    except ValueError as exc:
        raise TemplateMismatch(
            f"cannot find the message spans in the chat template's output: {token_problem}; in characters: {exc}. "
            "The template renders a turn differently once later messages follow (for example it drops the reasoning "
            "of earlier turns); train with a template that renders every turn the same way"
        ) from exc
    if got != ids:
        raise TemplateMismatch("the chat template's text tokenizes differently from its token output")
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    return [(bisect_right(ends, a), bisect_left(starts, b), t) for a, b, t in chars if b > a]


def _through_last(ids: list[int], start: int, end: int, token: int | None) -> int:
    """`end` cut back to just after the last `token` in ids[start:end] (unchanged when it is absent)."""
    if token is None:
        return end
    for j in range(end - 1, start - 1, -1):
        if ids[j] == token:
            return j + 1
    return end


def prompt_ids(messages: Sequence[dict[str, Any]], tools: list[Any] | None, tokenizer: Tokenizer) -> list[int]:
    """The token ids a model reads before it answers `messages`: the template with its generation prompt."""
    msgs = normalize_messages(messages, keep_parts=takes_images(tokenizer))
    return _Renderer(tokenizer, msgs, tools).ids(len(msgs), True)


def prompt_and_reply(
    messages: Sequence[dict[str, Any]], reply: dict[str, Any], tools: list[Any] | None, tokenizer: Tokenizer
) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the prompt with its generation prompt, and what the template renders for `reply`
    after it, through its end-of-turn token.

    Raises:
        ImageContent: a message holds images.
        TemplateMismatch: the prompt's rendering is not a prefix of the rendering with the reply, in tokens nor text.
    """
    msgs = normalize_messages([*messages, reply], keep_parts=takes_images(tokenizer))
    n = len(msgs)
    r = _Renderer(tokenizer, msgs, tools)
    prompt, full = r.ids(n - 1, True), r.ids(n, False)
    if full[: len(prompt)] == prompt:
        completion = full[len(prompt) :]
    else:
        head, whole = r.text(n - 1, True), r.text(n, False)
        if not whole.startswith(head):
            raise TemplateMismatch("the prompt's rendering is not a prefix of the rendering with the reply")
        completion = encode(tokenizer, whole[len(head) :])
    return prompt, completion[: _through_last(completion, 0, len(completion), tokenizer.eos_token_id)]


def trained_spans(labels: Sequence[int]) -> list[list[int]]:
    """The [start, end) runs of trained (non-IGNORE) labels."""
    spans: list[list[int]] = []
    start: int | None = None
    for j, label in enumerate(labels):
        if label != IGNORE and start is None:
            start = j
        elif label == IGNORE and start is not None:
            spans.append([start, j])
            start = None
    if start is not None:
        spans.append([start, len(labels)])
    return spans


def render_preview_row(
    input_ids: Sequence[int], labels: Sequence[int], tokenizer: Tokenizer, *, truncated: bool = False
) -> dict[str, Any]:
    """One row of `POST /fine-tunes/preview` (api-contract 3.10).

    Returns:
        {"input_ids", "labels", "tokens", "num_tokens", "num_trained_tokens", "trained_spans", "truncated"}.
    """
    ids = [int(t) for t in input_ids]
    labs = [int(t) for t in labels]
    if len(ids) != len(labs):
        raise ValueError(f"input_ids has {len(ids)} tokens but labels has {len(labs)}")
    tokens = tokenizer.convert_ids_to_tokens(ids) if ids else []
    return {
        "input_ids": ids,
        "labels": labs,
        "tokens": [str(t) for t in tokens],
        "num_tokens": len(ids),
        "num_trained_tokens": sum(1 for t in labs if t != IGNORE),
        "trained_spans": trained_spans(labs),
        "truncated": truncated,
    }
