"""NeuralMemory: the long-term memory as a sequence layer (paper v1 §3.1 and §4.4, NeurIPS §3.3).

    q, k, v = SiLU(CausalDepthwiseConv_4(x W_Q | x W_K | x W_V))      §4.4: conv after each projection, SiLU
    q, k    = q / ||q||_2, k / ||k||_2  (per head)                     §4.4: l2-normalised queries and keys
    theta_t = max_lr * sigmoid(x_t W_theta),  eta_t = sigmoid(x_t W_eta),  alpha_t = sigmoid(x_t W_alpha)
              per token and head, optionally per memory layer (NeurIPS App. B.3) and per channel (App. F)
    y       = memory(q, k, v, gates)                                   Eqs. 12-18, one memory per sequence and head
    out     = W_O (RMSNorm(y) * SiLU(x W_G))                           §4.4: normalisation and gating before W_O

Training and several tokens run the fused scan (`fused_memory`, `impl="fused"`, the default): one op with a
hand-written backward (C++ on CPU, Triton kernels on CUDA: `scan_triton`); `impl="triton"` insists on the kernels.
`impl="chunked"` and `impl="naive"` run the references they are tested against; under
torch.compile the layer runs `chunked_memory`, which the compiler traces. Decoding: a single token (T = 1) with
gradients off, outside autocast and with memory writes on, takes the fast one-token path (`decode_step`, built on
`titans.memory.step`): the same recurrence in a few dozen tensor ops. Tests hold every path equal.

Fast weights start from the learned M_0 for every sequence and live only in the returned state: they are never
shared across the batch and never written into a parameter. The outer loss back-propagates through every inner
update to W_Q, W_K, W_V, the gate projections and M_0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans.config.model import memory_defaults
from titans.matmul import Linear
from titans.memory.ablation import MemoryAblation, ablate_gates
from titans.memory.chunked import chunked_memory
from titans.memory.conv import CausalDepthwiseConv
from titans.memory.fused import fused_memory
from titans.memory.naive import naive_memory
from titans.memory.network import Activation, MemoryMLP
from titans.memory.state import MemoryState
from titans.memory.step import decode_linear, rms_norm_rows, step_layers, step_layers_fixed


@dataclass
class NeuralMemoryState:
    """What a stream carries between calls: the memory (weights, momentum, anchor) and the conv's last inputs.

    conv: [B, 3 * heads * head_dim, conv_kernel - 1], the pre-conv projections of the last tokens.
    """

    memory: MemoryState
    conv: Tensor

    def detach(self) -> NeuralMemoryState:
        return NeuralMemoryState(self.memory.detach(), self.conv.detach())


class FixedMemoryState(NamedTuple):
    """NeuralMemoryState for fixed-shape decoding (`NeuralMemory.decode_fixed`): tensors only, so that one compiled
    step serves every position. weights, momentum, anchor: per layer [B * H, d_l, d_{l-1}]; conv as in
    NeuralMemoryState; position: 0-d long tensor, the memory's stream position."""

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    anchor: tuple[Tensor, ...]
    conv: Tensor
    position: Tensor


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class NeuralMemory(nn.Module):
    """The LMM layer: x [B, T, dim] -> y [B, T, dim], with a carried per-sequence state."""

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        depth: int = 2,
        expansion: int = 4,
        activation: Activation = "gelu",
        residual_norm: bool = False,
        chunk_size: int = 16,
        impl: Literal["fused", "triton", "chunked", "naive"] = "fused",
        momentum: bool = True,
        forgetting: bool = True,
        per_layer_gates: bool = True,
        channelwise_forget: bool = False,
        max_lr: float = 1.0,
        conv_kernel: int = 4,
        checkpoint_every: int | None = None,
        grad_clip: float | None = None,
        theta_init: float | None = None,
        alpha_init: float | None = None,
        eta_init: float = 0.5,
        exact_last_layer: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"memory heads ({heads}) must divide the model dimension ({dim})")
        if impl not in ("fused", "triton", "chunked", "naive"):
            raise ValueError(f"memory impl must be 'fused', 'triton', 'chunked' or 'naive', got {impl!r}")
        if conv_kernel < 1 or chunk_size < 1 or max_lr <= 0:
            raise ValueError(
                f"need conv_kernel >= 1, chunk_size >= 1 and max_lr > 0; got {conv_kernel}, {chunk_size}, {max_lr}"
            )
        if channelwise_forget and not forgetting:
            raise ValueError("channelwise_forget needs forgetting=True")
        if theta_init is None:
            theta_init = min(0.05, max_lr / 2)
        if not 0 < theta_init < max_lr:
            raise ValueError(f"theta_init must lie in (0, max_lr={max_lr}) or be None, got {theta_init}")
        self.theta_init = theta_init  # the inner step size theta_t starts near this (reset_gates)
        if alpha_init is None:
            # Under M(x) = x + LN(MLP(x)) decay does not forget: LN hides the weights' scale, so shrinking them only
            # enlarges every later write relative to the state, and at 0.01 a token the outer gradient grows
            # exponentially with the sequence length (docs/paper_alignment.md, "Residual + LayerNorm").
            alpha_init = 1e-4 if residual_norm else 0.01
        if not 0 < alpha_init < 1:
            raise ValueError(f"alpha_init must lie in (0, 1) or be None, got {alpha_init}")
        self.alpha_init = alpha_init  # the forgetting rate alpha_t starts near this (reset_gates)
        if not 0 < eta_init < 1:
            raise ValueError(f"eta_init must lie in (0, 1), got {eta_init}")
        self.eta_init = eta_init  # the momentum decay eta_t starts near this (reset_gates)
        if exact_last_layer and residual_norm and impl != "naive":
            raise ValueError(
                "exact_last_layer with residual_norm needs impl='naive' (a residual + LayerNorm memory's errors are "
                f"not linear in its last layer, so there is no chunk-parallel form), got {impl!r}"
            )
        self.exact_last_layer = exact_last_layer  # the last layer learns token by token (naive_memory's docstring)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.chunk_size, self.impl, self.max_lr = chunk_size, impl, max_lr
        self.momentum, self.forgetting, self.channelwise_forget = momentum, forgetting, channelwise_forget
        self.checkpoint_every = checkpoint_every
        self.compile_backend: str | None = None  # compile_chunks()
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None (no clipping), got {grad_clip}")
        self.grad_clip = grad_clip  # max Frobenius norm of each token's inner gradient, per layer (None = off)
        self.update_memory = True  # False reads the memory without writing it (memory-check's ablation)
        self.ablation: MemoryAblation | None = None  # memory-check's changes to the update rule (ablation.py)
        # when a list, every forward appends {"surprise", "update_norm"} [B, H, T] to it (memory-check's probe)
        self.stats_sink: list[dict[str, Tensor]] | None = None
        self.network = MemoryMLP(self.head_dim, depth, heads, expansion, activation, residual_norm)

        inner = heads * self.head_dim
        self.to_qkv = Linear(dim, 3 * inner, bias=False)
        self.conv = CausalDepthwiseConv(3 * inner, conv_kernel)
        n_gate = depth if per_layer_gates else 1
        self.gate_groups = n_gate
        self.to_theta = Linear(dim, heads * n_gate)
        self.to_eta = Linear(dim, heads * n_gate) if momentum else None
        alpha_width = sum(d_out for d_out, _ in self.network.shapes) if channelwise_forget else n_gate
        self.to_alpha = Linear(dim, heads * alpha_width) if forgetting else None
        self.out_norm_weight = nn.Parameter(torch.ones(self.head_dim))
        self.to_gate = Linear(dim, inner, bias=False)
        self.to_out = Linear(inner, dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Memory-specific init, re-applied by TitansLM after its generic N(0, 0.02) pass over every nn.Linear."""
        self.conv.init_weights()
        self.reset_gates(theta=self.theta_init, eta=self.eta_init, alpha=self.alpha_init)

    def reset_gates(self, theta: float = 0.05, eta: float = 0.5, alpha: float = 0.01) -> None:
        """Start the gates near theta, eta and alpha (small input weights barely move them at initialisation).

        These starting points are engineering choices (the paper gives none): a small forgetting rate keeps the past,
        and eta = 0.5 keeps the first inner updates stable for an MLP memory (eta = 0.9 oscillates on repeated
        inputs; the outer loop can still learn larger values). theta: `memory.theta_init`, by default 0.25 for LMM and
        0.05 for MAC, MAG and MAL (`titans.config.model.memory_defaults`; this layer built directly: 0.05), with
        `inner_grad_clip` bounding the updates once the outer loop raises theta (docs/results.md, "The memory
        defaults by variant").
        """
        with torch.no_grad():
            for proj, value in ((self.to_theta, theta / self.max_lr), (self.to_eta, eta), (self.to_alpha, alpha)):
                if proj is None:
                    continue
                proj.weight.normal_(0.0, 0.02)
                proj.bias.fill_(_logit(value))

    @classmethod
    def from_config(cls, model_cfg) -> NeuralMemory:
        """Build from a `titans.config.ModelConfig` (memory depth is the seed's `model.memory_layers`)."""
        mem = model_cfg.memory
        defaults = memory_defaults(model_cfg.variant, mem)  # null = the variant's defaults
        return cls(
            dim=model_cfg.d_model,
            heads=mem.heads or model_cfg.n_heads,
            depth=model_cfg.memory_layers,
            expansion=mem.expansion,
            activation=mem.activation,
            residual_norm=mem.residual_norm,
            chunk_size=mem.chunk_size,
            impl=mem.impl,
            momentum=defaults.momentum,
            forgetting=mem.forgetting,
            per_layer_gates=mem.per_layer_gates,
            channelwise_forget=mem.channelwise_forget,
            max_lr=mem.max_lr,
            conv_kernel=mem.conv_kernel,
            checkpoint_every=mem.checkpoint_every,
            grad_clip=mem.inner_grad_clip,
            theta_init=defaults.theta_init,
            alpha_init=mem.alpha_init,
            eta_init=mem.eta_init,
            exact_last_layer=defaults.exact_last_layer,
        )

    def compile_chunks(self, enabled: bool = True, backend: str = "inductor") -> None:
        """With `impl="chunked"`: run the chunked scan's whole chunks through torch.compile (`chunked.compiled_chunk`);
        eager when off. The fused scan (`impl="fused"`, the default) is not affected: it is several times faster than
        compiled chunks (benchmarks/README.md), so the layer keeps it.

        Results equal the eager chunk's (tests). The first call pays the compilation (seconds to minutes on CPU,
        per grad mode and shape); decoding (one token) keeps its own step. backend: torch.compile's.
        """
        self.compile_backend = backend if enabled else None

    def initial_state(self, batch_size: int, device=None, dtype=None) -> NeuralMemoryState:
        """A fresh stream: M_0 for every sequence, zero momentum, an empty conv history."""
        conv = self.conv.empty_history(batch_size, device, dtype)
        return NeuralMemoryState(MemoryState.initial(self.network, batch_size), conv)

    def _gate_layers(self) -> list[Linear]:
        """The gates' projections that exist, in the order their logits sit side by side: theta, eta, alpha."""
        return [m for m in (self.to_theta, self.to_eta, self.to_alpha) if m is not None]

    def _gates(
        self, x: Tensor, logits: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | list[Tensor] | None]:
        """theta, eta [B, H, T, L] ([B, H, T] when one gate serves every layer) and alpha (the same, or a list of
        [B, H, T, d_l] channel-wise) from x [B, T, dim], or from the gates' logits side by side (`_gate_layers`'
        order) where `_forward` computed them with the other projections in one product."""
        batch, length, _ = x.shape

        def per_head(t: Tensor) -> Tensor:  # [B, T, H * n] -> [B, H, T, n], or [B, H, T] for one shared gate
            t = t.view(batch, length, self.heads, -1).permute(0, 2, 1, 3)
            # one gate for every layer is the contract's [B, H, T] (a trailing axis of 1 would mean depth 1)
            return t[..., 0] if t.shape[-1] == 1 else t

        if not self.update_memory:
            return per_head(x.new_zeros(batch, length, self.heads * self.gate_groups)), None, None
        layers = self._gate_layers()
        if logits is None:
            logits = torch.cat([layer(x) for layer in layers], dim=-1)
        # theta / max_lr, then eta and alpha where they exist: one sigmoid for all
        gates = iter(torch.sigmoid(logits).split([m.out_features for m in layers], dim=-1))
        theta = self.max_lr * per_head(next(gates))
        eta = per_head(next(gates)) if self.to_eta is not None else None
        alpha = per_head(next(gates)) if self.to_alpha is not None else None
        if alpha is not None and self.channelwise_forget:
            alpha = list(alpha.split([d_out for d_out, _ in self.network.shapes], dim=-1))
        if self.ablation is not None:
            return ablate_gates(self.ablation, theta, eta, alpha, self.network.depth)
        return theta, eta, alpha

    def forward(
        self, x: Tensor, state: NeuralMemoryState | None = None, stats: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, NeuralMemoryState]:
        """x [B, T, dim] -> (y [B, T, dim], state). Any split of a stream with the carried state equals one call."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"NeuralMemory expects x of shape [B, T, {self.dim}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"NeuralMemory expects a floating-point input, got {x.dtype}")
        batch, length, _ = x.shape
        if state is None:
            state = self.initial_state(batch, x.device, x.dtype)
        elif state.conv.shape[0] != batch:
            raise ValueError(
                f"the state holds {state.conv.shape[0]} sequences but x has batch size {batch}; "
                "pass state=None to start new sequences"
            )

        if stats is None and self.stats_sink is not None:
            stats = {}
            self.stats_sink.append(stats)
        if length == 1 and self.plain and not torch.is_grad_enabled():
            if not torch.is_autocast_enabled(x.device.type):
                return self.decode_step(x, state, stats)
        reset = self.ablation.reset_at if self.ablation is not None else None
        position = state.memory.position
        if reset is not None and position <= reset < position + length:
            return self._forward_with_reset(x, state, stats, reset - position)
        return self._forward(x, state, stats)

    @property
    def plain(self) -> bool:
        """Writes on, not probed, not ablated: the fast paths (one-token decode, fixed-shape and compiled steps),
        which implement none of those, may run."""
        return self.update_memory and self.stats_sink is None and self.ablation is None

    def _forward_with_reset(
        self, x: Tensor, state: NeuralMemoryState, stats: dict[str, Tensor] | None, before: int
    ) -> tuple[Tensor, NeuralMemoryState]:
        """`MemoryAblation.reset_at` inside this call: `before` tokens, M and S back to M_0 and 0, then the rest."""
        parts = [{}, {}] if stats is not None else [None, None]
        outputs = []
        if before > 0:
            y, state = self._forward(x[:, :before], state, parts[0])
            outputs.append(y)
        # the position is kept: chunk boundaries stay where they were, and the reset happens once per sequence
        fresh = replace(MemoryState.initial(self.network, x.shape[0]), position=state.memory.position)
        y, state = self._forward(x[:, before:], NeuralMemoryState(fresh, state.conv), parts[1])
        outputs.append(y)
        if stats is not None:
            for key in parts[1]:
                stats[key] = torch.cat([p[key] for p in parts if p and key in p], dim=-1)
        return torch.cat(outputs, dim=1), state

    def _forward(
        self, x: Tensor, state: NeuralMemoryState, stats: dict[str, Tensor] | None
    ) -> tuple[Tensor, NeuralMemoryState]:
        """`forward` after validation: the general path for any length."""
        batch, length, _ = x.shape
        # inner-loop arithmetic in float32 at least, even under autocast (bf16 inner updates drift)
        inner_dtype = torch.promote_types(x.dtype, torch.float32)
        pre_qkv, out_gate, gate_logits = self._projections(x, inner_dtype)
        qkv, conv_state = self.conv(pre_qkv, state.conv)
        with torch.autocast(device_type=x.device.type, enabled=False):
            qkv = F.silu(qkv.to(inner_dtype)).view(batch, length, 3, self.heads, self.head_dim)
            qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, H, T, head_dim]
            q, k = F.normalize(qkv[:2], dim=-1).unbind(0)  # q and k l2-normalised per head in one call
            v = qkv[2]
            theta, eta, alpha = self._gates(x.to(inner_dtype), gate_logits)
            memory_fn, extra = self._memory_function()
            y, memory_state = memory_fn(
                q, k, v, theta, eta, alpha, self.network, state.memory, self.chunk_size, stats, self.grad_clip, **extra
            )
            y = F.rms_norm(y, (self.head_dim,), self.out_norm_weight.to(inner_dtype), eps=1e-6)
        y = y.to(x.dtype).permute(0, 2, 1, 3).reshape(batch, length, self.heads * self.head_dim)
        out = self.to_out(y * F.silu(out_gate))
        return out, NeuralMemoryState(memory_state, conv_state)

    def _projections(self, x: Tensor, inner_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [B, T, dim] -> (q|k|v before the conv [B, T, 3 * inner], the output gate's pre-activation [B, T, inner],
        the gates' logits [B, T, n] or None).

        Every projection of x as one product against the weights side by side, where that computes what the layers
        would: x already in the inner dtype (the gates run there) and no autocast (which would run the product in low
        precision). One product and one backward instead of five, each of whose input gradients autograd would add
        up; the gates' few output columns are too narrow for an efficient product of their own. Otherwise (or with
        writes off, where the gates are not read, or traced by torch.compile, which lays out each `Linear` itself)
        the layers one by one, the gates left to `_gates`.
        """
        inner = self.heads * self.head_dim
        separate = x.dtype != inner_dtype or torch.is_autocast_enabled(x.device.type) or not self.update_memory
        if separate or torch.compiler.is_compiling():
            return self.to_qkv(x), self.to_gate(x), None
        layers = self._gate_layers()
        weight = torch.cat([self.to_qkv.weight, self.to_gate.weight, *(m.weight for m in layers)])
        bias = torch.cat([layers[0].bias.new_zeros(4 * inner), *(m.bias for m in layers)])
        pre_qkv, out_gate, gate_logits = F.linear(x, weight, bias).split(
            [3 * inner, inner, weight.shape[0] - 4 * inner], -1
        )
        return pre_qkv, out_gate, gate_logits

    def _memory_function(self) -> tuple[Callable, dict]:
        """The memory function for `impl` and its extra arguments. While torch.compile traces the layer (MAC's
        compiled segments) the fused op gives way to `chunked_memory`, which the compiler can trace."""
        exact = {"exact_last_layer": self.exact_last_layer}
        if self.impl == "naive":
            return naive_memory, exact
        if self.impl in ("fused", "triton") and not torch.compiler.is_compiling():
            backend = {"fused": "auto", "triton": "triton"}[self.impl]
            return fused_memory, {"checkpoint_every": self.checkpoint_every, "backend": backend, **exact}
        return chunked_memory, {
            "checkpoint_every": self.checkpoint_every, "compile_backend": self.compile_backend, **exact
        }  # fmt: skip

    def decode_step(
        self, x: Tensor, state: NeuralMemoryState, stats: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, NeuralMemoryState]:
        """One token with its carried state, forward only: x [B, 1, dim] -> (y [B, 1, dim], state).

        `forward` routes here for T = 1 when gradients are off, autocast is off and memory writes are on; the result
        equals the general path's (tested). Unchecked: `forward` validated x and the state's batch size.
        Everything runs on [B, dim] rows (a 2-D linear is one matmul) and on N = B * H flattened memories.
        """
        q, k, v, theta, eta, keep, out_gate, conv_state = self._decode_inputs(x[:, 0], state.conv)
        y, memory_state = step_layers(
            q, k, v, theta, eta, keep, self.network, state.memory, self.chunk_size, self.grad_clip, stats,
            self.exact_last_layer,
        )  # fmt: skip
        return self._decode_output(y, out_gate, x.dtype).unsqueeze(1), NeuralMemoryState(memory_state, conv_state)

    def fixed_state(self, state: NeuralMemoryState) -> FixedMemoryState:
        """The state as `decode_fixed` carries it: contiguous [N, d_l, d_{l-1}] tensors, the position as a tensor."""
        n = state.memory.batch_size * self.heads

        def flat(ts: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return tuple(t.reshape(n, *t.shape[2:]).clone(memory_format=torch.contiguous_format) for t in ts)

        memory = state.memory
        position = torch.tensor(memory.position, device=state.conv.device)
        return FixedMemoryState(
            flat(memory.weights), flat(memory.momentum), flat(memory.anchor), state.conv.contiguous(), position
        )

    def state_from_fixed(self, fixed: FixedMemoryState) -> NeuralMemoryState:
        """The NeuralMemoryState that `fixed` stands for (the inverse of `fixed_state`)."""
        batch = fixed.conv.shape[0]

        def shaped(ts: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return tuple(t.view(batch, self.heads, *t.shape[1:]) for t in ts)

        position = int(fixed.position)
        memory = MemoryState(shaped(fixed.weights), shaped(fixed.momentum), shaped(fixed.anchor), position)
        return NeuralMemoryState(memory, fixed.conv)

    def decode_fixed(self, row: Tensor, fixed: FixedMemoryState) -> tuple[Tensor, FixedMemoryState]:
        """One token on fixed-shape state: row [B, dim] -> (y [B, dim], state after it). Forward only.

        The same function as `decode_step` (tested), written so that torch.compile traces it once for every position:
        no Python branch on the position and no shape that grows (`step_layers_fixed`).
        """
        q, k, v, theta, eta, keep, out_gate, conv_state = self._decode_inputs(row, fixed.conv)
        y, weights, momentum, anchor = step_layers_fixed(
            q, k, v, theta, eta, keep, self.network, fixed.weights, fixed.momentum, fixed.anchor,
            fixed.position, self.chunk_size, self.grad_clip, self.exact_last_layer,
        )  # fmt: skip
        out = self._decode_output(y, out_gate, row.dtype)
        # a contiguous conv history keeps every step's input strides equal to the first's (no recompilation)
        conv_state = conv_state.contiguous()
        return out, FixedMemoryState(tuple(weights), tuple(momentum), tuple(anchor), conv_state, fixed.position + 1)

    def _decode_inputs(self, row: Tensor, conv: Tensor) -> tuple:
        """A token's memory inputs: row [B, dim] -> (q, k, v [N, 1, head_dim], theta, eta, keep per layer as
        `rank_one_step` takes them, the output gate's pre-activation [B, inner], the conv history)."""
        batch = row.shape[0]
        heads, head_dim, n_gate, n = self.heads, self.head_dim, self.gate_groups, row.shape[0] * self.heads
        inner, depth = self.heads * self.head_dim, self.network.depth
        inner_dtype = torch.promote_types(row.dtype, torch.float32)
        gate_layers = self._gate_layers()
        if row.dtype == inner_dtype:
            # every projection of x in one matmul: q/k/v, the gates and the output gate
            fused = decode_linear(row, self.to_qkv, self.to_gate, *gate_layers)
            pre_qkv, out_gate, gate_logits = fused.split([3 * inner, inner, fused.shape[1] - 4 * inner], dim=1)
        else:  # a low-precision input without autocast: the gates run in float32, as in the general path
            pre_qkv, out_gate = self.to_qkv(row), self.to_gate(row)
            gate_logits = torch.cat([m(row.to(inner_dtype)) for m in gate_layers], dim=1)
        qkv, conv_state = self.conv.step(pre_qkv, conv)  # [B, 3 * H * head_dim]
        qkv = F.silu(qkv if qkv.dtype == inner_dtype else qkv.to(inner_dtype))
        qkv = qkv.view(batch, 3, heads, head_dim).transpose(0, 1).reshape(3, n, 1, head_dim)
        qk = F.normalize(qkv[:2], dim=-1)  # q and k l2-normalised per head in one call
        q, k, v = qk[0], qk[1], qkv[2]  # each [N, 1, head_dim]

        def per_layer(t: Tensor) -> list[Tensor]:  # [B, H * n_gate] -> depth x [N, 1, 1]
            t = t.reshape(n, n_gate, 1, 1)  # a view for B = 1; a copy of a few numbers otherwise
            return [t[:, i if n_gate > 1 else 0] for i in range(depth)]

        gates = torch.sigmoid(gate_logits)  # theta / max_lr, eta, alpha side by side
        width = heads * n_gate
        theta_gate = gates[:, :width]
        theta = per_layer(theta_gate if self.max_lr == 1.0 else self.max_lr * theta_gate)
        eta = per_layer(gates[:, width : 2 * width]) if self.to_eta is not None else None
        keep = None
        if self.to_alpha is not None:
            retain = 1 - gates[:, gates.shape[1] - self.to_alpha.out_features :]  # (1 - alpha_t) of Eq. 13
            if self.channelwise_forget:
                # one value per output row of each weight matrix: [N, d_l, 1]
                keep = list(retain.reshape(n, -1, 1).split([d_out for d_out, _ in self.network.shapes], dim=1))
            else:
                keep = per_layer(retain)
        return q, k, v, theta, eta, keep, out_gate, conv_state

    def _decode_output(self, y: Tensor, out_gate: Tensor, dtype: torch.dtype) -> Tensor:
        """y [N, 1, head_dim] (the memory's read) -> the layer's output [B, dim]: RMSNorm, output gate, W_O."""
        batch = out_gate.shape[0]
        norm_weight = self.out_norm_weight
        if norm_weight.dtype != y.dtype:
            norm_weight = norm_weight.to(y.dtype)
        y = rms_norm_rows(y, norm_weight, 1e-6)  # = F.rms_norm(y, (head_dim,), norm_weight, eps=1e-6)
        # [N, 1, head_dim] is the token's heads in order: a view gives [B, H * head_dim]
        y = (y if y.dtype == dtype else y.to(dtype)).view(batch, self.heads * self.head_dim) * F.silu(out_gate)
        return decode_linear(y, self.to_out) if y.dtype == self.to_out.weight.dtype else self.to_out(y)
