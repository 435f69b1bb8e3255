"""The short causal depthwise convolution after the memory's projections (v1 §4.4), with a hand-written backward.

    y_t[c] = sum_j w[c, j] x_{t-K+1+j}[c],   j = 0 .. K-1   (x_{<0} from the carried history, zeros for a fresh stream)

`CausalDepthwiseConv` is the layer; `causal_depthwise_conv` the function it runs for more than one token. Its
reference is `F.conv1d` with groups = channels on the history-padded input (`causal_depthwise_conv_reference`); the
tests hold the two equal in outputs, carried history and every gradient, in float64.

Why not conv1d itself: at the memory's shapes (kernel 4, hundreds of channels, a few hundred tokens) its depthwise
kernel costs more than K shifted multiply-adds, forward and especially backward. Why a hand-written backward over
those multiply-adds: autograd records each tap's slice, product and sum, and its backward then zero-fills a
history-padded buffer per tap and multiplies by a weight column read with a stride of K; here each tap reads a
contiguous row of the transposed weight, and the backward accumulates every tap into one buffer (the profile that
motivated it: benchmarks/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _CausalConv(torch.autograd.Function):
    """x [B, T, C], history [B, C, K-1], weight [C, 1, K] -> (y [B, T, C], new history [B, C, K-1])."""

    @staticmethod
    def forward(ctx, x: Tensor, history: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        kernel, length = weight.shape[-1], x.shape[1]
        padded = torch.cat([history.to(x.dtype).transpose(1, 2), x], dim=1)  # [B, K-1+T, C], time-major
        taps = weight[:, 0].to(x.dtype).t().contiguous()  # [K, C]: each tap's weights one contiguous row
        y = padded[:, :length] * taps[0]
        for j in range(1, kernel):
            y.addcmul_(padded[:, j : j + length], taps[j])
        ctx.save_for_backward(padded, taps)
        ctx.dtypes = (history.dtype, weight.dtype)
        # the new history is the last K-1 inputs, as a copy: a view would keep the whole padded buffer alive
        return y, padded[:, length:].transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_history: Tensor | None) -> tuple[Tensor | None, ...]:
        padded, taps = ctx.saved_tensors
        history_dtype, weight_dtype = ctx.dtypes
        kernel, length = taps.shape[0], padded.shape[1] - taps.shape[0] + 1
        grad_padded = padded.new_zeros(padded.shape)
        grad_taps = None
        if grad_y is not None:
            grad_y = grad_y.contiguous()
            for j in range(kernel):
                grad_padded[:, j : j + length].addcmul_(grad_y, taps[j])
            if ctx.needs_input_grad[2]:
                flat = grad_y.reshape(-1, grad_y.shape[-1])
                grad_taps = torch.stack(
                    [(flat * padded[:, j : j + length].reshape(flat.shape)).sum(0) for j in range(kernel)]
                )
        if grad_history is not None:
            grad_padded[:, length:] += grad_history.transpose(1, 2)
        grad_x = grad_padded[:, kernel - 1 :] if ctx.needs_input_grad[0] else None
        grad_past = grad_padded[:, : kernel - 1].transpose(1, 2).to(history_dtype) if ctx.needs_input_grad[1] else None
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = (
                torch.zeros(taps.shape[1], 1, kernel, dtype=weight_dtype, device=taps.device)
                if grad_taps is None
                else grad_taps.t().unsqueeze(1).to(weight_dtype)
            )
        return grad_x, grad_past, grad_weight


def causal_depthwise_conv(x: Tensor, history: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """x [B, T, C], history [B, C, K-1] (the last K-1 inputs before x), weight [C, 1, K] -> (y [B, T, C], the new
    history [B, C, K-1]), in x's dtype; feeding a stream in pieces with the returned history equals one call."""
    return _CausalConv.apply(x, history, weight)


def causal_depthwise_conv_reference(x: Tensor, history: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The same through `F.conv1d` (groups = channels) on the history-padded input: the tests' reference."""
    padded = torch.cat([history.to(x.dtype), x.transpose(1, 2)], dim=2)  # [B, C, K-1+T]
    y = F.conv1d(padded, weight.to(x.dtype), groups=weight.shape[0])
    return y.transpose(1, 2), padded[:, :, x.shape[1] :]


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal conv over time with a carried history: x [B, T, C] -> [B, T, C] (v1 §4.4's short conv).

    forward(x, history [B, C, K-1] or None) -> (y, new history); feeding a stream in pieces with the returned
    history equals one call. Initialised near the identity (last tap 1), so it starts as a pass-through.
    """

    def __init__(self, channels: int, kernel: int = 4) -> None:
        super().__init__()
        if kernel < 1:
            raise ValueError(f"conv kernel must be >= 1, got {kernel}")
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.init_weights()

    def init_weights(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02)
            self.weight[:, 0, -1] += 1.0

    def empty_history(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(
            batch_size,
            self.weight.shape[0],
            self.kernel - 1,
            device=device or self.weight.device,
            dtype=dtype or self.weight.dtype,
        )

    def forward(self, x: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if history is None:
            history = self.empty_history(x.shape[0], x.device, x.dtype)
        if x.shape[1] == 1 and not torch.is_autocast_enabled(x.device.type):  # autocast would cast conv1d
            out, history = self.step(x[:, 0], history)
            return out.unsqueeze(1), history
        return causal_depthwise_conv(x, history, self.weight)

    def step(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """One token: x [B, C] -> (y [B, C], new history [B, C, K-1]).

        The output is the weighted sum of the last `kernel` inputs, taken straight from the carried history (conv1d's
        setup costs more than the sum; same value up to summation order).
        """
        window = torch.cat([history if history.dtype == x.dtype else history.to(x.dtype), x.unsqueeze(-1)], dim=2)
        weight = self.weight[:, 0] if self.weight.dtype == x.dtype else self.weight[:, 0].to(x.dtype)  # [C, K]
        return (window * weight).sum(-1), window[:, :, 1:]
