"""tuneforge: a self-hosted LLM fine-tuning platform, wire-compatible with Together AI's fine-tuning API."""

__version__ = "0.1.0"
