"""infermeter: measure what LLM inference costs on a real machine."""

__version__ = "0.1.0"
