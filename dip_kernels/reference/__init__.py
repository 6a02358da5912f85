"""Eager PyTorch reference implementations: the ground truth every kernel is tested against.

Each module exposes the plain differentiable function (what a user would otherwise run) plus
``<op>_forward`` / ``<op>_backward`` with the exact signatures every backend implements.
The reference backward recomputes the forward under autograd, so it saves nothing.
"""
