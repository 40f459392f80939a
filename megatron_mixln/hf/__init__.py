"""Hugging Face interoperability: export any norm schedule to transformers, import LLaMA checkpoints."""
