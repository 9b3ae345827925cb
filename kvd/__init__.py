"""kvd: a per-node KV-cache transfer daemon for LLM serving."""

__version__ = "0.1.0"
