"""The fine-tuning API (contract section 3): jobs, their limits, prices, events, checkpoints, metrics and downloads."""
