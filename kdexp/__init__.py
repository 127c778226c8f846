"""kdexp: knowledge-distillation experiments on LLMs, with numbers you can publish."""

__version__ = "0.1.0"
