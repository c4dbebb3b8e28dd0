"""mpipeline: a multi-core pipeline for LLM inference requests.

``mpipeline.Pipeline`` is resolved lazily (PEP 562), so importing the package
stays free of side effects and cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "RequestFailed", "__version__"]

if TYPE_CHECKING:
    from mpipeline.errors import RequestFailed
    from mpipeline.pipeline import Pipeline


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from mpipeline.pipeline import Pipeline

        return Pipeline
    if name == "RequestFailed":
        from mpipeline.errors import RequestFailed

        return RequestFailed
    raise AttributeError(f"module 'mpipeline' has no attribute {name!r}")
