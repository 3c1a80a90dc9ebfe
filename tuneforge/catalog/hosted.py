"""The hosted service's fine-tunable models by the names it gives them, each with its hub repo: a job names the
model as it would on the hosted service, and the weights download from the hub (or HF_ENDPOINT) on first use.

Per model: the parameter count (tied embeddings counted once, rounded to three significant figures, as the model
cards state it), the context length (`max_position_embeddings` of its config, capped at 131072 tokens), vision
support, and DPO where the model is text-only (preference tuning here trains text models only). LoRA defaults are
the catalog's (`ModelLimits`: rank 8 of at most 64 on every linear projection). The figures were written from the
models' published configs and model cards; this machine cannot reach the hub to check them, so a model card that
disagrees is the authority, and the entry should follow it.

Listed by default; `TUNEFORGE_HOSTED_CATALOG=0` leaves only the built-in and added models (the test suite's
servers, which must not try to download 8B models).
"""

from __future__ import annotations

from tuneforge.catalog.entries import ModelEntry, ModelLimits

MAX_CONTEXT = 131072  # the longest sequence a catalog entry allows, whatever the model's config says


def _entry(name: str, repo: str, params: float, context: int, *, vision: bool = False) -> ModelEntry:
    seq = min(context, MAX_CONTEXT)
    return ModelEntry(
        name=name,
        source_kind="hub",
        source=repo,
        limits=ModelLimits(max_seq_length=seq, max_seq_length_dpo=seq, supports_vision=vision, supports_dpo=not vision),
        description=f"{repo} from the hub (about {params / 1e9:.3g}B parameters, {context:,}-token context)",
        params=int(params),
    )


# (hosted name, hub repo, parameters, context length[, vision])
HOSTED: tuple[ModelEntry, ...] = (
    # Llama 3.x
    _entry("meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", "meta-llama/Llama-3.1-8B-Instruct", 8.03e9, 131072),
    _entry("meta-llama/Meta-Llama-3.1-8B-Reference", "meta-llama/Llama-3.1-8B", 8.03e9, 131072),
    _entry("meta-llama/Meta-Llama-3.1-70B-Instruct-Reference", "meta-llama/Llama-3.1-70B-Instruct", 70.6e9, 131072),
    _entry("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", 1.24e9, 131072),
    _entry("meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.2-3B-Instruct", 3.21e9, 131072),
    _entry("meta-llama/Llama-3.3-70B-Instruct-Reference", "meta-llama/Llama-3.3-70B-Instruct", 70.6e9, 131072),
    # Qwen 2.5
    _entry("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", 0.494e9, 32768),
    _entry("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", 1.54e9, 32768),
    _entry("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-3B-Instruct", 3.09e9, 32768),
    _entry("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", 7.62e9, 32768),
    _entry("Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-14B-Instruct", 14.7e9, 32768),
    _entry("Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-32B-Instruct", 32.5e9, 32768),
    _entry("Qwen/Qwen2.5-72B-Instruct", "Qwen/Qwen2.5-72B-Instruct", 72.7e9, 32768),
    # Qwen 3
    _entry("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B", 0.596e9, 40960),
    _entry("Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B", 1.72e9, 40960),
    _entry("Qwen/Qwen3-4B", "Qwen/Qwen3-4B", 4.02e9, 40960),
    _entry("Qwen/Qwen3-8B", "Qwen/Qwen3-8B", 8.19e9, 40960),
    _entry("Qwen/Qwen3-14B", "Qwen/Qwen3-14B", 14.8e9, 40960),
    _entry("Qwen/Qwen3-32B", "Qwen/Qwen3-32B", 32.8e9, 40960),
    # DeepSeek-R1 distills
    _entry("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1.78e9, 131072),
    _entry("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 7.62e9, 131072),
    _entry("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 14.8e9, 131072),
    _entry("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 8.03e9, 131072),
    _entry("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 70.6e9, 131072),
    # Gemma 2 and 3 (Gemma 3 from 4B on reads images)
    _entry("google/gemma-2-2b-it", "google/gemma-2-2b-it", 2.61e9, 8192),
    _entry("google/gemma-2-9b-it", "google/gemma-2-9b-it", 9.24e9, 8192),
    _entry("google/gemma-2-27b-it", "google/gemma-2-27b-it", 27.2e9, 8192),
    _entry("google/gemma-3-1b-it", "google/gemma-3-1b-it", 1.0e9, 32768),
    _entry("google/gemma-3-4b-it", "google/gemma-3-4b-it", 4.30e9, 131072, vision=True),
    _entry("google/gemma-3-12b-it", "google/gemma-3-12b-it", 12.2e9, 131072, vision=True),
    _entry("google/gemma-3-27b-it", "google/gemma-3-27b-it", 27.4e9, 131072, vision=True),
    # Mistral
    _entry("mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", 7.25e9, 32768),
    # Phi
    _entry("microsoft/Phi-3.5-mini-instruct", "microsoft/Phi-3.5-mini-instruct", 3.82e9, 131072),
    _entry("microsoft/phi-4", "microsoft/phi-4", 14.7e9, 16384),
    # SmolLM2 and SmolVLM (SmolLM2-135M-Instruct is the built-in GGUF entry)
    _entry("HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", 0.362e9, 8192),
    _entry("HuggingFaceTB/SmolLM2-1.7B-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct", 1.71e9, 8192),
    _entry("HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM-256M-Instruct", 0.256e9, 8192, vision=True),
    _entry("HuggingFaceTB/SmolVLM-500M-Instruct", "HuggingFaceTB/SmolVLM-500M-Instruct", 0.507e9, 8192, vision=True),
)
