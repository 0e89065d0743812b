"""edgevlm.kernels"""
