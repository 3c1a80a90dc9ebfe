"""Development helpers for the compute plane (tiny models for tests and benchmarks)."""
