"""geoseg: roads and buildings from GeoTIFF scenes of any size."""

from __future__ import annotations

import logging

from geoseg.errors import ConfigError, GeosegError, InputError, ModelError, OutputError

__all__ = ["ConfigError", "GeosegError", "InputError", "ModelError", "OutputError", "__version__"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
