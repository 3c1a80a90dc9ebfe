"""The models list (api-contract 4.3): catalog entries and the caller's fine-tuned outputs."""
