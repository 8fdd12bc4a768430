"""Models: loading by path, hub id or GGUF file (``loading``, ``gguf``, ``fetch``), the built-in model
(``builtin``), the block attention (``attention``) and what miopt reads from a model (``modeling``)."""
