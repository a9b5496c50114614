"""Bridges between sparsegen and model libraries (Hugging Face transformers)."""
