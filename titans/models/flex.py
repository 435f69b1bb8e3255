"""FlexAttention path for the sequence attention of baseline, MAG and MAL (`model.attention_impl=flex`).

The same visibility rule as `Attention`'s SDPA path (tested equal), written as a FlexAttention mask so that CUDA
skips the blocks no query sees: a sliding window with an always-visible prefix (Eqs. 26-27) touches
O(T * (window + n_prefix)) scores instead of T^2. MAC's segment attention stays on SDPA: it is one short dense
block per segment ([persistent | retrieved | segment]), where block sparsity has nothing to skip.

Keys are laid out as `Attention.forward` builds them: [prefix keys P | tail keys], where the prefix holds stream
positions 0 .. P-1 (windowed attention only, P <= n_prefix) and the tail the contiguous positions k0 .. k0+Tk-1.
Queries are the positions q0 .. q0+T-1. A query at position t sees
- a tail key at position s when s <= t and (full attention, or t - s < window);
- a prefix key at position p when p <= t - window: the prefix keys still inside the window are in the tail, so each
  key is counted once.

Backward on CPU is not implemented by PyTorch's FlexAttention, so on CPU this path serves inference only (it runs
eagerly there, in float64 too, which is what the CPU tests use); training with it needs CUDA, and `RunConfig` and
`titans.train` refuse `attention_impl=flex` on a CPU run with a message that says so.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

ATTENTION_IMPLS = ("sdpa", "flex")


def flex_available() -> None:
    """Raise a RuntimeError naming the fix when this torch has no FlexAttention."""
    _flex_module()


def _flex_module() -> Any:
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError as error:  # torch builds without FlexAttention
        raise RuntimeError(
            f"model.attention_impl=flex needs torch.nn.attention.flex_attention, which this torch "
            f"({torch.__version__}) lacks; use model.attention_impl=sdpa"
        ) from error
    return module


@lru_cache(maxsize=1)
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process: uncompiled, it materialises the full score matrix. Default dynamic
    shapes: a second sequence length (evaluation, streaming pieces) compiles one shape-generic kernel, not one each."""
    return torch.compile(_flex_module().flex_attention)


def _mask_mod(window: int | None, q0: torch.Tensor, k0: torch.Tensor, n_prefix: torch.Tensor) -> Callable[..., Any]:
    """The visibility rule above as a FlexAttention mask_mod. q0, k0, n_prefix: 0-d long tensors (tensors, not
    Python ints, so that a new stream offset reuses the compiled kernel)."""

    def visible(b: torch.Tensor, h: torch.Tensor, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
        t = q0 + q_index
        s = k0 + (k_index - n_prefix)  # position of a tail key
        in_tail = (k_index >= n_prefix) & (s <= t)
        if window is None:
            return in_tail
        return (in_tail & (t - s < window)) | ((k_index < n_prefix) & (k_index <= t - window))

    return visible


@lru_cache(maxsize=64)
def _block_mask(
    window: int | None, q0: int, k0: int, n_prefix: int, q_len: int, kv_len: int, device: torch.device
) -> Any:
    """The BlockMask of one layout, cached: a training run asks for the same one at every step and layer."""
    module = _flex_module()
    offsets = [torch.tensor(value, device=device) for value in (q0, k0, n_prefix)]
    mask_mod = _mask_mod(window, *offsets)
    return module.create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


def flex_window_attention(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    seen: int,
    window: int | None,
) -> torch.Tensor:
    """Causal (optionally sliding-window, with prefix) attention through FlexAttention.

    q [B, H, T, Dh] at positions seen .. seen+T-1; k/v_prefix [B, H, P, Dh] at positions 0 .. P-1 (P = 0 for full
    attention); k/v_tail [B, H, o+T, Dh] at positions seen-o .. seen+T-1. Returns [B, H, T, Dh], equal to the SDPA
    path of `Attention.forward` (same rule, same scale 1/sqrt(Dh)).
    """
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_tail, v_tail)):
        raise RuntimeError(
            "model.attention_impl=flex cannot train on CPU: PyTorch's FlexAttention has no CPU backward. "
            "Use model.attention_impl=sdpa on CPU (the same attention), or train on CUDA"
        )
    T = q.shape[-2]
    P = k_prefix.shape[-2]
    o = k_tail.shape[-2] - T
    keys = torch.cat([k_prefix, k_tail], dim=2) if P else k_tail
    values = torch.cat([v_prefix, v_tail], dim=2) if P else v_tail
    # SDPA runs in autocast's dtype under autocast (rotated q, k can be float32 while v is bf16); FlexAttention is
    # not on autocast's lists, so cast here to compute what the SDPA path computes
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, keys.dtype), values.dtype)
    q, keys, values = q.to(dtype), keys.to(dtype), values.to(dtype)
    block_mask = _block_mask(window, seen, seen - o, P, T, keys.shape[-2], q.device)
    if q.device.type == "cpu":  # eager (forward only, checked above): the exact reference the CPU tests use
        return _flex_module().flex_attention(q, keys, values, block_mask=block_mask)
    return _compiled_flex()(q, keys, values, block_mask=block_mask)
