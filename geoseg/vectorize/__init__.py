"""Vector layers from predictions: building polygons and road centerlines, exact across seams."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from geoseg.vectorize.options import LayerOutput, VectorizeOptions, VectorizeOutputs

if TYPE_CHECKING:
    from geoseg.vectorize.run import vectorize_prediction

__all__ = ["LayerOutput", "VectorizeOptions", "VectorizeOutputs", "vectorize_prediction"]


def __getattr__(name: str) -> Any:
    # The engine pulls in scipy, scikit-image and networkx: import it when first used, so that
    # commands which only need the options (predict, run --dry-run) start faster.
    if name == "vectorize_prediction":
        from geoseg.vectorize.run import vectorize_prediction

        return vectorize_prediction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
