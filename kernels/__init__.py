"""Triton kernels of teacache_fast, one self-contained file per op."""
