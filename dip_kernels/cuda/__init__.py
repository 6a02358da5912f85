"""CUDA backend: thin Python shims over the compiled extension dip_kernels._C (csrc/).

The modules here import without the extension (the compiled ops are looked up on first call);
dip_kernels.backends only selects them when dip_kernels._C was built with CUDA.
"""
