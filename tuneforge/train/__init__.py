"""Training: TrainSpec in, JSON-lines events out; recipes run in their own process (python -m tuneforge.train)."""
