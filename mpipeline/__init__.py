"""mpipeline: a multi-core pipeline for LLM inference requests."""

__version__ = "0.1.0"
