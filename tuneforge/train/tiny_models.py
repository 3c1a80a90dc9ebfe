"""Test fixtures, not training code: tiny, hub-free models for tests, benchmarks and demos. A byte-level BPE
tokenizer trained on a few sentences (ChatML chat template) and random-initialised llama / qwen2 / qwen3 causal LMs
of ~100k parameters.

`save_tiny_model(folder, arch)` writes a complete model folder (config, safetensors, tokenizer, chat
template) that the catalog can serve as a `local` source. Deterministic, well under a second, no network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "qwen2", "qwen3")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0..3

# ChatML (same rendering as SmolLM2/Qwen) *with* {% generation %} markers around the assistant content AND its
# <|im_end|>, so `return_assistant_tokens_mask=True` / TRL `assistant_only_loss=True` work and the model learns to stop.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello, how are you today? I am fine, thank you.",
    "system user assistant You are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } : ; , . ! ? ' \"",
]


def make_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: never produces <unk>, any UTF-8 round-trips) trained on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes -> no OOV
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        model_max_length=2048,
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


def make_tiny_model(
    arch: str,
    vocab_size: int,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    tie: bool = True,
    dtype: torch.dtype = torch.float32,
    pad_token_id: int | None = 3,
    eos_token_id: int = 2,
    bos_token_id: int = 1,
) -> Any:
    """arch in {"llama", "qwen2", "qwen3"}. ~vocab*hidden + 2*~50k params."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; use one of {ARCHITECTURES}")
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=2048,
        tie_word_embeddings=tie,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )
    if arch in ("qwen2", "qwen3"):
        kw["max_window_layers"] = layers
        kw["use_sliding_window"] = False
    cfg = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    return model.eval()


def save_tiny_model(folder: str | Path, arch: str = "llama", *, seed: int = 0, **kwargs: Any) -> Path:
    """Write a tiny model + tokenizer folder; returns the folder."""
    folder = Path(folder)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(arch, vocab_size=len(tokenizer), seed=seed, **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
