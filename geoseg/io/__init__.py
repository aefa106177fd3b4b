"""Reading scenes and writing outputs: local, remote (HTTP, object storage) and STAC scenes read
window by window, Cloud-Optimized GeoTIFFs written tile by tile, temporary output names."""
