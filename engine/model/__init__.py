"""The DeepSeek-V4 math in the order of the paper: config, blocks, attention, MoE, mHC, RoPE.

The plain-torch reference paths live here; the fast paths in `engine.kernels` are compared against them.
"""
