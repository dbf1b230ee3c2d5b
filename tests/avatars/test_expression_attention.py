"""The expression cross-attention as a diffusers attention processor."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models import attention_processor
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from avatars.models.expression_attention import (
    TOKENS_KWARG,
    ExpressionAttentionLayers,
    ExpressionAttnProcessor,
    expression_target_blocks,
)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _unet(upcast_attention: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
        cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True, upcast_attention=upcast_attention,
    )


def _perturb(layers: ExpressionAttentionLayers) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for proj in layers.output_projections():
            for p in proj.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 7, 32, generator=g),
            torch.randn(2, 4, 32, generator=g))


def test_processor_on_every_attention_module_and_no_kwarg_warning(monkeypatch):
    unet = _unet()
    layers = ExpressionAttentionLayers.from_unet(unet)
    layers.install(unet)
    processors = unet.attn_processors
    assert all(isinstance(p, ExpressionAttnProcessor) for p in processors.values())
    with_expression = sorted(name for name, p in processors.items() if p.expression is not None)
    assert with_expression == sorted(f"{name}.attn2.processor" for name, _ in expression_target_blocks(unet))
    assert len(with_expression) == len(layers) == 6  # 2 down + 4 up; the mid block is left out
    assert all(isinstance(p.base, AttnProcessor2_0) for p in processors.values())
    warnings = []
    monkeypatch.setattr(attention_processor.logger, "warning", lambda msg, *a, **k: warnings.append(msg))
    latents, t, context, tokens = _inputs()
    unet(latents, t, encoder_hidden_states=context, cross_attention_kwargs={TOKENS_KWARG: tokens})
    assert warnings == []
    # installing twice wraps the original processors, not the wrappers
    layers.install(unet)
    assert not any(isinstance(p.base, ExpressionAttnProcessor) for p in unet.attn_processors.values())
    ExpressionAttentionLayers.uninstall(unet)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


@pytest.mark.parametrize("classic", [False, True], ids=["sdpa", "classic-upcast"])
@torch.no_grad()
def test_zero_init_equivalence_with_upcast_attention(classic):
    """SD2.1 sets upcast_attention; the classic processor honours it, SDPA ignores it. Either way the
    expression layers copy attn2's settings and start as the identity on the base UNet's output."""
    unet = _unet(upcast_attention=True)
    if classic:
        unet.set_attn_processor(AttnProcessor())
    latents, t, context, tokens = _inputs()
    base = unet(latents, t, encoder_hidden_states=context).sample
    layers = ExpressionAttentionLayers.from_unet(unet)
    layers.install(unet)
    kind = AttnProcessor if classic else AttnProcessor2_0
    assert all(layer.upcast_attention and type(layer.processor) is kind for layer in layers.layers)
    ours = unet(latents, t, encoder_hidden_states=context, cross_attention_kwargs={TOKENS_KWARG: tokens}).sample
    torch.testing.assert_close(ours, base, rtol=0, atol=0)
    _perturb(layers)
    moved = unet(latents, t, encoder_hidden_states=context, cross_attention_kwargs={TOKENS_KWARG: tokens}).sample
    assert (moved - base).abs().max() > 1e-4
    no_tokens = unet(latents, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(no_tokens, base, rtol=0, atol=0)


@torch.no_grad()
def test_processor_adds_the_expression_attention_to_attn2():
    unet = _unet()
    layers = ExpressionAttentionLayers.from_unet(unet)
    _perturb(layers)
    _, block = expression_target_blocks(unet)[0]
    hidden = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    _, _, context, tokens = _inputs()
    expected = (block.attn2(hidden, encoder_hidden_states=context)
                + layers.layers[0](hidden, encoder_hidden_states=tokens))
    layers.install(unet)
    got = block.attn2(hidden, encoder_hidden_states=context, **{TOKENS_KWARG: tokens})
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # a batch that repeats each frame (e.g. doubled for guidance) repeats its tokens
    doubled = block.attn2(hidden.repeat_interleave(2, 0), encoder_hidden_states=context.repeat_interleave(2, 0),
                          **{TOKENS_KWARG: tokens})
    torch.testing.assert_close(doubled, expected.repeat_interleave(2, 0), rtol=1e-5, atol=1e-6)


def test_transformer_block_compiles_without_graph_breaks():
    """Tokens arrive as an argument and the processor mutates nothing, so torch.compile traces a
    whole transformer block (regional compilation) as one graph."""
    torch._dynamo.reset()
    unet = _unet()
    layers = ExpressionAttentionLayers.from_unet(unet)
    _perturb(layers)
    layers.install(unet)
    _, block = expression_target_blocks(unet)[0]
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 16, 32, generator=g)
    context = torch.randn(2, 7, 32, generator=g)
    tokens = torch.randn(2, 4, 32, generator=g)
    kwargs = {"encoder_hidden_states": context, "cross_attention_kwargs": {TOKENS_KWARG: tokens}}
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(hidden, **kwargs), block(hidden, **kwargs), rtol=0, atol=0)
    torch._dynamo.reset()
