"""Native CPU kernels (cpu_kernels.c), compiled on first use; see build.py."""
