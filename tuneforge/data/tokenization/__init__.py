"""Tokenization for training: chat templates, loss masks and preference pairs (packing: train/batching.py).

Token ids and labels in plain lists; knows no torch, no transformers, no storage and no jobs.
"""

from tuneforge.data.tokenization.chat import render_preview_row
from tuneforge.data.tokenization.examples import TokenizationReport, TokenizedExample
from tuneforge.data.tokenization.preference import PreferenceExample, tokenize_preference_records
from tuneforge.data.tokenization.tokenize import tokenize_blob, tokenize_records

__all__ = [
    "PreferenceExample",
    "TokenizationReport",
    "TokenizedExample",
    "render_preview_row",
    "tokenize_blob",
    "tokenize_preference_records",
    "tokenize_records",
]
