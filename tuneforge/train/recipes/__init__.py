"""Recipes: one linear script per training method (see `train/registry.py` for the table)."""
