"""Evaluation protocols on frozen teacher features (runnable without Ray)."""
