"""edgevlm.calibration"""
