"""edgevlm.export"""
