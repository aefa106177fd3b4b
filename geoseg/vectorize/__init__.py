"""Vector layers from predictions: building polygons and road centerlines, exact across seams."""

from __future__ import annotations

from geoseg.vectorize.options import LayerOutput, VectorizeOptions, VectorizeOutputs
from geoseg.vectorize.run import vectorize_prediction

__all__ = ["LayerOutput", "VectorizeOptions", "VectorizeOutputs", "vectorize_prediction"]
