"""The op benchmark's launches column (teacache_fast.cli.launches): what it
counts as a kernel on CPU."""
from __future__ import annotations

import torch

from teacache_fast.cli.launches import NOT_KERNELS, count_launches, enable_compiled_kernel_events


def test_views_allocations_and_scalar_reads_are_no_kernels():
    x = torch.randn(4, 8)
    assert count_launches(lambda: x.view(-1).reshape(2, 16).t(), "cpu") == 0
    assert count_launches(lambda: torch.empty(3), "cpu") == 0
    assert count_launches(lambda: x[0, 0].item(), "cpu") == 0
    assert "aten::view" in NOT_KERNELS and "aten::add" not in NOT_KERNELS


def test_each_data_op_is_one_kernel():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    assert count_launches(lambda: torch.add(x, y), "cpu") == 1
    assert count_launches(lambda: (x - y).abs().mean(), "cpu") == 3
    assert count_launches(lambda: x.float(), "cpu") == 0            # already fp32: no copy
    assert count_launches(lambda: x.to(torch.bfloat16), "cpu") == 1  # a conversion copies


def test_compiled_graph_counts_its_cpp_kernels():
    enable_compiled_kernel_events()
    x, y = torch.randn(4, 8), torch.randn(4, 8)

    @torch.compile
    def chain(a, b):
        return (a - b).abs().mean() / b.abs().mean()

    chain(x, y)
    n = count_launches(lambda: chain(x, y), "cpu")
    assert 1 <= n < 5   # fused: fewer kernels than the 5 eager ops
