"""Tessera: build, train, evaluate and serve vision-language models in plain PyTorch."""

__version__ = "0.1.0"
