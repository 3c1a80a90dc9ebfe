"""A model folder's tokenizer and chat template as transformers loads them, without transformers.

`HFTokenizer` reads the files `save_pretrained` writes (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`, `additional_chat_templates/*.jinja`, the legacy `special_tokens_map.json`) and fits the
`Tokenizer` protocol of `tokenizer.py`, so `chat.py` and `tokenize.py` run on it unchanged: the control plane can
show how a file will be tokenized (`POST /fine-tunes/preview`) with the very code training runs, on the very files
the training run loads with `AutoTokenizer`.

What it mirrors of transformers 5 (`TokenizersBackend` and `apply_chat_template`):
- encoding is the `tokenizers` library's on `tokenizer.json`, with truncation and padding off;
- special tokens (`bos_token`, `eos_token`, ...) come from `tokenizer_config.json`, else `special_tokens_map.json`;
- chat templates render in jinja2's immutable sandbox with transformers' options, filters and globals
  (`trim_blocks`, `lstrip_blocks`, `loopcontrols`, `{% generation %}`, `tojson`, `raise_exception`,
  `strftime_now`, `dict`, `namespace`); the template sees the messages with null-valued keys dropped and the
  reasoning copied under `reasoning_content` and `thinking`, `tools`, `documents`, `add_generation_prompt` and the
  special tokens; the rendered text is encoded without added special tokens.

It covers what `chat.py`, `tokenize.py` and previews call; not `continue_final_message`, assistant masks, control
token sanitizing or tensors. Knows nothing of storage: callers hand it the files' bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named tokens templates see (as `bos_token`, `eos_token`, ...).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning goes by; the template sees it under the first two as well (transformers does this).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerFilesError(ValueError):
    """The files do not make a usable tokenizer (no `tokenizer.json`, unreadable JSON, ...)."""


def read_folder(folder: Path) -> dict[str, bytes]:
    """The tokenizer files of a model folder (those present), by their path inside it."""
    names = [TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE]
    files = {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}
    extra = folder / CHAT_TEMPLATE_DIR
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            files[f"{CHAT_TEMPLATE_DIR}/{path.name}"] = path.read_bytes()
    return files


def is_tokenizer_file(name: str) -> bool:
    """Whether a path inside a model folder is one `read_folder` would read."""
    if name in (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE):
        return True
    head, _, tail = name.partition("/")
    return head == CHAT_TEMPLATE_DIR and "/" not in tail and tail.endswith(".jinja")


class HFTokenizer:
    """A fast tokenizer with its chat template(s), built from a model folder's files (see the module doc)."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        raw = files.get(TOKENIZER_FILE)
        if raw is None:
            raise TokenizerFilesError(f"the model has no {TOKENIZER_FILE} (a fast tokenizer is needed)")
        try:
            self._tok = RustTokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # the Rust side raises a plain Exception for a bad file
            raise TokenizerFilesError(f"{TOKENIZER_FILE} cannot be loaded: {exc}") from exc
        # transformers turns both off unless a call asks for them.
        self._tok.no_truncation()
        self._tok.no_padding()
        config = _json_object(files, CONFIG_FILE)
        tokens: dict[str, Any] = {k: config[k] for k in SPECIAL_TOKENS if config.get(k) is not None}
        if "added_tokens_decoder" not in config:  # as transformers: the legacy map only counts without it
            legacy = _json_object(files, SPECIAL_TOKENS_MAP_FILE)
            tokens.update({k: legacy[k] for k in SPECIAL_TOKENS if legacy.get(k) is not None})
        self.special_tokens_map: dict[str, str] = {k: _content(v) for k, v in tokens.items()}
        self.chat_template: str | dict[str, str] | None = _chat_template(files, config)

    # -- special tokens ------------------------------------------------------------------------------------------

    def _token_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        if token is None:
            return None
        index = self._tok.token_to_id(token)
        if index is None and name != "unk_token":
            return self.unk_token_id
        return index

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._token_id("unk_token")

    # -- encoding ------------------------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str],
        *args: Any,
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`{"input_ids", "attention_mask"[, "offset_mapping"]}` for one text, or lists of them for a batch."""
        if isinstance(text, str):
            enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
            out: dict[str, Any] = {"input_ids": list(enc.ids), "attention_mask": list(enc.attention_mask)}
            if return_offsets_mapping:
                out["offset_mapping"] = list(enc.offsets)
            return out
        encs = self._tok.encode_batch(list(text), add_special_tokens=add_special_tokens)
        batch: dict[str, Any] = {
            "input_ids": [list(e.ids) for e in encs],
            "attention_mask": [list(e.attention_mask) for e in encs],
        }
        if return_offsets_mapping:
            batch["offset_mapping"] = [list(e.offsets) for e in encs]
        return batch

    def convert_ids_to_tokens(self, ids: int | Sequence[int], *args: Any, **kwargs: Any) -> Any:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat templates ------------------------------------------------------------------------------------------

    def get_chat_template(self, tools: Sequence[Any] | None = None) -> str:
        """The template transformers would pick: `tool_use` when tools are given and the model has one, else the
        default. Raises ValueError when the model has none."""
        template = self.chat_template
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ValueError(f"the model has several chat templates and no default ({', '.join(sorted(template))})")
        if template is None:
            raise ValueError("the model's tokenizer has no chat template")
        return template

    def apply_chat_template(
        self,
        conversation: Any,
        *args: Any,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """The rendered text (`tokenize=False`), or `{"input_ids", "attention_mask"}` (`return_dict=False`: the ids).

        Raises:
            ValueError: an empty conversation, or a model without a chat template.
            jinja2.TemplateError: the template fails (or calls `raise_exception`).
        """
        for unsupported in ("continue_final_message", "return_assistant_tokens_mask", "sanitize_control_tokens"):
            if kwargs.pop(unsupported, False):
                raise ValueError(f"{unsupported} is not supported here")
        for ignored in ("chat_template", "padding", "truncation", "max_length", "return_tensors", "tokenizer_kwargs"):
            kwargs.pop(ignored, None)
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        compiled = _compile(self.get_chat_template(tools))
        messages = _template_messages(conversation)
        variables = _plain({**self.special_tokens_map, **kwargs})
        text = compiled.render(
            messages=messages,
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        if not tokenize:
            return text
        out = self(text, add_special_tokens=False)
        return out if return_dict else out["input_ids"]


def _json_object(files: Mapping[str, bytes], name: str) -> dict[str, Any]:
    raw = files.get(name)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise TokenizerFilesError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise TokenizerFilesError(f"{name} does not hold a JSON object")
    return value


def _content(token: Any) -> str:
    """A special token as configured: a string, or an AddedToken dict with its `content`."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return str(token)


def _chat_template(files: Mapping[str, bytes], config: dict[str, Any]) -> str | dict[str, str] | None:
    """As transformers: template files win over the config's `chat_template` (a string or a list of named ones);
    one default template is a string, several make a dict by name."""
    templates: dict[str, str] = {}
    if CHAT_TEMPLATE_FILE in files:
        templates["default"] = files[CHAT_TEMPLATE_FILE].decode("utf-8")
    for name, raw in sorted(files.items()):
        if name.startswith(f"{CHAT_TEMPLATE_DIR}/"):
            templates[name.removeprefix(f"{CHAT_TEMPLATE_DIR}/").removesuffix(".jinja")] = raw.decode("utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    value = config.get("chat_template")
    if isinstance(value, list):
        return {str(t["name"]): str(t["template"]) for t in value if isinstance(t, dict)}
    return value if isinstance(value, str) else None


def _template_messages(conversation: Any) -> list[dict[str, Any]]:
    """The messages as the template sees them: plain data, null-valued keys dropped, reasoning under every name."""
    out: list[dict[str, Any]] = []
    for message in conversation:
        if not isinstance(message, Mapping):
            raise TypeError(f"Chat messages should be dicts, but got {message!r}.")
        m = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _plain(value: Any) -> Any:
    """A fresh copy made of JSON types only: templates run sandboxed and must not reach the callers' objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


# -- the jinja environment (as transformers' `_compile_jinja_template`) ---------------------------------------------


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it for assistant masks only)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Not jinja's own filter, which escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates, without the attributes of the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace`, refusing underscore-prefixed attributes (a way towards CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # the same trick as jinja's Namespace: `self` may be a key
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    if _version(jinja2.__version__) < (3, 1, 6):  # as transformers: older sandboxes have known escapes
        raise ValueError(f"chat templates need jinja2>=3.1.6 (installed: {jinja2.__version__})")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)
