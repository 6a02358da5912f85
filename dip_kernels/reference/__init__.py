"""Eager PyTorch reference implementations: the ground truth every kernel is tested against.

Each module exposes the plain differentiable function (what a user would otherwise run) plus
``<op>_forward`` / ``<op>_backward`` with the exact signatures every backend implements.
The reference backward recomputes the forward and applies its derivative written out (never
re-entering autograd from inside a custom op); tests check it against autograd of the forward.
"""
