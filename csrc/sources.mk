# SPDX-License-Identifier: Apache-2.0
# The CUDA translation units of the C API, the one list: csrc/tests/Makefile,
# csrc/emu/Makefile and setup.py all read it.
CU := status rel_l1 modulate decide residual
