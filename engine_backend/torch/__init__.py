"""Torch engine: real compute over Llama-architecture Hugging Face models (see engine.py)."""
