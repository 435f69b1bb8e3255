"""Matrix products laid out for the CPU's fast GEMM path inside torch.compile'd code.

On CPU, torch's matmul of small batched matrices runs several times slower when the right operand is a transposed view
(its last axis not contiguous) than when it is contiguous (measured in benchmarks/README.md). The memory's chunk math
multiplies by transposes everywhere (h W^T, h a^T, g a with g^T on the left), and autograd turns every product A B into
backward products with B^T and A^T, so a compiled training segment issues thousands of such calls.

`matmul(a, b)` is a @ b, and when traced by torch.compile it copies a transposed right operand into a contiguous one
first, in the forward and in its own backward (the copy is one fused pass over a small matrix, much cheaper than
the slow product). Eager it is plain `a @ b`: there a copy is one more dispatched op, and the eager code stays the
plain reference. `Linear` is nn.Linear computed the same way (its forward x W^T multiplies by a transposed weight).
Same values up to the summation order of the GEMM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _product(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with b made contiguous when it is a transposed view (the product's slow layout)."""
    if b.dim() >= 2 and b.stride(-1) != 1:
        b = b.contiguous()
    return a @ b


class _LaidOutMatmul(torch.autograd.Function):
    """a @ b whose forward and backward products both get a contiguous right operand."""

    @staticmethod
    def forward(a: Tensor, b: Tensor) -> Tensor:
        return _product(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _product(grad, b.transpose(-1, -2))
            grad_a = _sum_to(grad_a, a.shape)
        if ctx.needs_input_grad[1]:
            grad_b = _product(a.transpose(-1, -2), grad)
            grad_b = _sum_to(grad_b, b.shape)
        return grad_a, grad_b


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Undo matmul's broadcasting of leading axes: sum grad down to `shape`."""
    if grad.shape == shape:
        return grad
    extra = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(extra))) if extra > 0 else grad
    axes = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape, strict=True)) if s == 1 and g != 1)
    return grad.sum(dim=axes, keepdim=True) if axes else grad


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b (both at least 2-D, torch.matmul's broadcasting); see the module docstring for the layout."""
    if not torch.compiler.is_compiling():
        return a @ b
    return _LaidOutMatmul.apply(a, b)


class Linear(nn.Linear):
    """nn.Linear whose compiled training forward multiplies through `matmul` (same parameters, function and
    state_dict).

    Traced with gradients on, x [..., in] is flattened to rows, so forward and backward are single 2-D products.
    Without gradients (a compiled decode step: one row against each weight) the copy of W^T would cost as much as
    the product it speeds up, so the layer stays nn.Linear.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
            return super().forward(x)
        rows = matmul(x.reshape(-1, x.shape[-1]), self.weight.t())
        out = rows.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias
