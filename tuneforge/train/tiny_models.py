"""Test fixtures, not training code: tiny, hub-free models for tests, benchmarks and demos. A byte-level BPE
tokenizer trained on a few sentences (ChatML chat template) and random-initialised llama / qwen2 / qwen3 causal LMs
of ~100k parameters.

`save_tiny_model(folder, arch)` writes a complete model folder (config, safetensors, tokenizer, chat
template) that the catalog can serve as a `local` source. `save_tiny_vlm(folder)` writes a vision-language one: an
Idefics3 (SmolVLM's architecture) with a 1-layer vision tower on 32x32 images, the same tokenizer with the image
tokens added, SmolVLM's chat template and the model's own processor (saved by it, so `AutoProcessor` loads it).
Deterministic, well under a second, no network.
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


# SmolVLM's chat template: a content list of text and image parts per message; each turn ends with <end_of_utterance>.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
VLM_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
VLM_IMAGE_SIZE = 32  # pixels: images are resized to fit, then seen as (32/8)^2 patches, 4 tokens after pixel shuffle


def save_tiny_vlm(
    folder: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, embedding_scale: float = 1.0
) -> Path:
    """Write a tiny Idefics3 vision-language model with its processor (~120k parameters at hidden 64); returns the
    folder. `embedding_scale` multiplies the random token embeddings (with the default 0.02 init, the frozen tied
    head of a LoRA run cannot make any logit stand out)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    folder = Path(folder)
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VLM_SPECIALS})
    tokenizer.eos_token = "<end_of_utterance>"  # as SmolVLM's: every turn ends with it
    eos = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    size = {"longest_edge": VLM_IMAGE_SIZE}
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size=size, max_image_size=size)
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=SMOLVLM_TEMPLATE)  # fmt: skip
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                max_position_embeddings=2048, pad_token_id=3, eos_token_id=eos, bos_token_id=1,
                tie_word_embeddings=True)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=VLM_IMAGE_SIZE, patch_size=8)  # fmt: skip
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2, tie_word_embeddings=True,
                            image_token_id=tokenizer.vocab["<image>"])  # fmt: skip
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(embedding_scale)
    model.generation_config.pad_token_id = 3
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
