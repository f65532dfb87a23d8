"""pistill: turn a large language model into a small one that runs well on a Raspberry Pi."""

__version__ = "0.1.0"
