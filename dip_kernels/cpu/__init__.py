"""CPU-side torch implementations: the dip ops' plans (dip_kernels/plan) on torch ops, one module per
op, and the head's ``cpu`` backend (patch_detailer_onednn.py, its own CPU schedule)."""
