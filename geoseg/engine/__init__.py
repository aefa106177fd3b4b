"""The prediction engine: a scene's chunk grid (at the model's GSD when resampled), chunk
sizes against memory, the Dask cluster and task stream, per-chunk work, and the per-scene
driver that writes the COGs and streams the vectors."""
