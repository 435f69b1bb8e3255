"""The memory's causal depthwise conv: the hand-written backward equals conv1d's autograd (float64), streams equal one
call, and a token's output never depends on later tokens."""

import pytest
import torch

from titans.memory.conv import CausalDepthwiseConv, causal_depthwise_conv, causal_depthwise_conv_reference


def _inputs(kernel: int, batch: int = 3, length: int = 11, channels: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=g, dtype=torch.float64, requires_grad=True)
    history = torch.randn(batch, channels, kernel - 1, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(channels, 1, kernel, generator=g, dtype=torch.float64, requires_grad=True)
    return x, history, weight


def _grads(fn, x, history, weight, grad_y, grad_history):
    y, new_history = fn(x, history, weight)
    loss = (y * grad_y).sum() + (new_history * grad_history).sum()
    return (y, new_history, *torch.autograd.grad(loss, (x, history, weight)))


@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_equals_conv1d_in_values_and_every_gradient(kernel):
    x, history, weight = _inputs(kernel)
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(x.shape, generator=g, dtype=torch.float64)
    grad_history = torch.randn(history.shape, generator=g, dtype=torch.float64)
    fast = _grads(causal_depthwise_conv, x, history, weight, grad_y, grad_history)
    reference = _grads(causal_depthwise_conv_reference, x, history, weight, grad_y, grad_history)
    for name, a, b in zip(["y", "history", "dx", "dhistory", "dweight"], fast, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_gradcheck_with_only_the_output_or_only_the_history_used():
    x, history, weight = _inputs(4, batch=2, length=6, channels=3)
    assert torch.autograd.gradcheck(lambda *a: causal_depthwise_conv(*a)[0], (x, history, weight))
    assert torch.autograd.gradcheck(lambda *a: causal_depthwise_conv(*a)[1], (x, history, weight))


def test_stream_in_pieces_equals_one_call_and_is_causal():
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(6, 4).double()
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    full, full_history = conv(x)
    outputs, history = [], None
    for piece in x.split([1, 5, 2, 1, 4], dim=1):
        out, history = conv(piece, history)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(history, full_history, rtol=0, atol=0)
    changed = x.clone()
    changed[:, 7:] += 1.0
    torch.testing.assert_close(conv(changed)[0][:, :7], full[:, :7], rtol=0, atol=0)
    assert not torch.allclose(conv(changed)[0][:, 7:], full[:, 7:])


def test_mixed_dtypes_compute_in_the_input_dtype_and_return_gradients_in_each_own():
    x, history, weight = _inputs(4)
    y, new_history = causal_depthwise_conv(x.float(), history, weight)
    assert y.dtype == new_history.dtype == torch.float32
    (y.sum() + new_history.sum()).backward()
    assert history.grad.dtype == weight.grad.dtype == torch.float64
    expected = causal_depthwise_conv_reference(x.detach(), history.detach(), weight.detach())[0]
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
