"""CPU-side torch implementations of the dip ops' plans (dip_kernels/plan), one module per op."""
