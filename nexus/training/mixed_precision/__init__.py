"""FP8 / MXFP8 / FP4 layers, mixed-precision configuration and gradient scaling."""
