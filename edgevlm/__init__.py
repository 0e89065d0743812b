"""edgevlm: trained 3D medical vision-language models, fast and offline on one workstation."""

__version__ = "0.1.0"
