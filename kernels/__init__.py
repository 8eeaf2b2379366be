"""Triton kernels, installed as ``ibot_fast.kernels`` (never as a top-level ``kernels`` package:
that name is taken on PyPI). Empty until the fused-loss issue lands; every kernel here keeps an
eager PyTorch reference path in ``ibot_fast``."""
