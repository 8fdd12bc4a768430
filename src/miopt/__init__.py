"""miopt: preference alignment of language models by mutual-information optimisation."""

__version__ = "0.1.0"
