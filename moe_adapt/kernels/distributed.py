"""A differentiable sum over the ranks of a process group, for statistics whose loss needs every rank's tokens
(the MI loss's task-expert matrix)."""

import torch
import torch.distributed as dist


def _summed_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: every rank's input reaches every rank's output, so the backward sums the
    incoming gradients over ranks too. (What `torch.distributed.nn.functional.all_reduce` did; torch deprecates it.)"""

    @staticmethod
    def forward(ctx, tensor):
        return _summed_over_ranks(tensor)

    @staticmethod
    def backward(ctx, grad):
        return _summed_over_ranks(grad)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over ranks, with the gradient summed over ranks in the backward."""
    return _AllReduceSum.apply(tensor)
