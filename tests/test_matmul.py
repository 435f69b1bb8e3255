"""titans.matmul: the compiled products (contiguous right operands, forward and backward) equal plain a @ b."""

from __future__ import annotations

import pytest
import torch

from titans.matmul import Linear, matmul

DT = torch.float64


@pytest.mark.parametrize(
    ("shape_a", "shape_b", "transpose_b"),
    [
        ((3, 4, 5, 6), (3, 4, 6, 7), False),  # batched, contiguous right operand: its backward needs b^T laid out
        ((3, 4, 5, 6), (3, 4, 7, 6), True),  # batched, right operand a transposed view (h W^T)
        ((5, 6), (7, 6), True),  # 2-D
        ((2, 3, 5, 6), (6, 7), False),  # broadcast right operand: its gradient sums over the batch axes
        ((5, 6), (3, 6, 7), False),  # broadcast left operand
        ((2, 1, 5, 6), (1, 4, 6, 7), False),  # size-1 axes broadcast on both sides
    ],
)
def test_compiled_matmul_equals_plain_product_and_gradients(shape_a, shape_b, transpose_b) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(*shape_a, dtype=DT, generator=gen, requires_grad=True)
    b = torch.randn(*shape_b, dtype=DT, generator=gen, requires_grad=True)
    weight = torch.randn(*torch.broadcast_shapes(shape_a[:-2], shape_b[:-2]), shape_a[-2], 7, dtype=DT, generator=gen)

    def loss(fn, a, b):
        right = b.transpose(-1, -2) if transpose_b else b
        return (fn(a, right) * weight).sum()

    want = loss(torch.matmul, a, b)
    want_grads = torch.autograd.grad(want, (a, b))
    compiled = torch.compile(lambda a, b: loss(matmul, a, b), backend="aot_eager", fullgraph=True)
    got = compiled(a, b)
    got_grads = torch.autograd.grad(got, (a, b))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)


def test_matmul_takes_the_laid_out_path_only_when_traced() -> None:
    a, b = torch.randn(4, 5, dtype=DT, requires_grad=True), torch.randn(6, 5, dtype=DT, requires_grad=True)
    out = matmul(a, b.t())  # eager: plain a @ b (the eager code stays the reference), not the autograd Function
    assert type(out.grad_fn).__name__ == "MmBackward0"
    torch.testing.assert_close(out, a @ b.t())


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_linear_equals_nn_linear(bias: bool) -> None:
    torch.manual_seed(0)
    layer = Linear(6, 5, bias=bias).to(DT)
    reference = torch.nn.Linear(6, 5, bias=bias).to(DT)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 6, dtype=DT, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got, want = compiled(x), reference(x)
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    x_grad, x.grad = x.grad, None
    want.square().sum().backward()
    torch.testing.assert_close(x_grad, x.grad)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    if bias:
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
