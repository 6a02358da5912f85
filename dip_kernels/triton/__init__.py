"""Triton backends of the dip ops, one module per op family (signatures as in dip_kernels/reference)."""
