"""The configuration and modeling files copied into every custom export (self-contained: torch + transformers only)."""
