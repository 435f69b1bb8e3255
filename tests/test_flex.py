"""`model.attention_impl=flex` computes the SDPA path's attention: one pass, streaming, layer level (CPU, float64,
forward only: PyTorch's FlexAttention has no CPU backward). Gradients and the compiled CUDA kernel: tests/test_cuda.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from model_configs import VOCAB, tiny_model_config

from titans.config import ConfigError, load_config
from titans.models import build_model
from titans.models.layers import Attention

DT = torch.float64
# (variant, baseline attention): every model whose sequence attention flex serves
FLEX_MODELS = [("baseline", "full"), ("baseline", "sliding"), ("MAG", "sliding"), ("MAL", "sliding")]


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    # Eager FlexAttention warns that it is unfused; on CPU that is the point (an exact float64 reference).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def model_pair(variant: str, baseline_attention: str):
    """The same weights with attention_impl sdpa and flex."""
    models = []
    for impl in ("sdpa", "flex"):
        torch.manual_seed(0)
        cfg = tiny_model_config(variant, baseline_attention=baseline_attention, attention_impl=impl)
        models.append(build_model(cfg).to(DT).eval())
    return models


@pytest.mark.parametrize(("variant", "baseline_attention"), FLEX_MODELS)
@pytest.mark.parametrize("split", [[23], [3, 1, 7, 12], [1] * 9 + [14]], ids=str)
@torch.no_grad()
def test_flex_model_equals_sdpa_model(variant: str, baseline_attention: str, split: list[int]) -> None:
    sdpa, flex = model_pair(variant, baseline_attention)
    idx = torch.randint(0, VOCAB, (2, sum(split)), generator=torch.Generator().manual_seed(3))
    expected, _, _ = sdpa(idx)
    state, pieces, start = None, [], 0
    for n in split:  # pieces after the first continue the stream (queries at offset > 0, prefix and tail keys)
        logits, _, state = flex(idx[:, start : start + n], state=state)
        pieces.append(logits)
        start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("window", "n_prefix"), [(None, 0), (40, 0), (40, 5), (300, 3), (1, 2)])
@torch.no_grad()
def test_flex_layer_equals_dense_reference_over_many_blocks(window: int | None, n_prefix: int) -> None:
    """T = 300 spans three of FlexAttention's 128-position blocks, so its block mask skips whole blocks (window 40)
    and keeps some partly: the sparse layout must equal the dense rule."""
    torch.manual_seed(0)
    layer = Attention(32, 2, 10000.0, window=window, n_prefix=n_prefix, impl="flex").to(DT)
    x = torch.randn(2, 300, 32, dtype=DT)
    y, _ = layer(x)
    torch.testing.assert_close(y, layer.reference_forward(x), rtol=1e-12, atol=1e-12)


def test_flex_backward_on_cpu_is_a_clear_error() -> None:
    layer = Attention(16, 2, 10000.0, window=4, impl="flex")
    with pytest.raises(RuntimeError, match="flex cannot train on CPU.*attention_impl=sdpa"):
        layer(torch.randn(1, 9, 16))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.variant=MAC", "model.attention_impl=flex"], "applies to the sequence attention of baseline, MAG"),
        (["model.variant=LMM", "model.attention_impl=flex"], "LMM has no attention"),
        (["model.variant=MAG", "model.attention_impl=flex", "training.device=cpu"], "cannot train on CPU"),
        (["model.attention_impl=Flex"], "model.attention_impl must be one of"),
    ],
)
def test_flex_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_training_with_flex_on_a_cpu_device_fails_before_the_first_step(tmp_path) -> None:
    from titans.train import train

    cfg = load_config(
        None,
        [
            "model.variant=MAG",
            "model.attention_impl=flex",
            "model.d_model=16",
            "model.n_heads=2",
            "data.num_samples=20",
            "training.batch_size=4",
            "training.max_steps=1",
            "training.progress=false",
            f"training.out_dir={tmp_path}",
        ],
    )
    if torch.cuda.is_available():
        pytest.skip("auto picks CUDA here")
    with pytest.raises(ConfigError, match="cannot train on CPU"):
        train(cfg)
    assert not any(tmp_path.rglob("ckpt_*.pt"))
