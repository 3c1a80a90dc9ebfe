"""Serving: model-server processes that host one base model with its LoRA adapters (engine, adapters, backends),
and the client the torch-free API uses to reach them."""
