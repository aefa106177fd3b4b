"""Models: bundles (``model.json`` + safetensors), encoders and their starting weights, the
halo a network needs, and the inference backends that run one (torch, OpenVINO)."""
