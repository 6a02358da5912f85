"""dip: the DiP pixel-space diffusion model ("DiP: Taming Diffusion Models in Pixel Space",
arXiv 2511.18822) built on the dip_kernels ops, with its diffusion, sampling, training and
evaluation code."""

__version__ = "0.1.0"
