"""Expression conditioning: expression code -> tokens, plus one extra cross-attention per
transformer block of the UNet's down and up blocks, installed as a diffusers attention processor.

Each extra attention reads the same normalised hidden states as the block's ``attn2`` and its
output is added to ``attn2``'s output, so it lands in the same residual branch. It starts as a
copy of that ``attn2`` (query, key and value projections, head count, ``upcast_attention``) with
a zero output projection: at step 0 the pretrained UNet is unchanged. The frozen ``attn2`` keeps
attending to the stored empty-prompt embedding.

This follows diffusers' pattern for an extra cross-attention (``IPAdapterAttnProcessor2_0``):
:class:`ExpressionAttnProcessor` is installed with ``unet.set_attn_processor`` and the tokens
arrive per call as ``cross_attention_kwargs={"expression_tokens": tokens}``. The processor keeps
no per-call state, so a compiled transformer block sees a pure function of its inputs.

The mid block is left out: the paper counts 15 layers on SD2.1 (6 down + 9 up), and the
mid block already receives the ControlNet's mid residual, which carries the per-pixel signal.

:class:`ExpressionTokens` and :class:`ExpressionAttentionLayers` are diffusers models
(``save_pretrained`` / ``from_pretrained``); the layers' config records which block each one
belongs to and its shape, so they are rebuilt without the UNet.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from avatars.models import autocast

#: The ``cross_attention_kwargs`` key that carries the expression tokens through the UNet.
TOKENS_KWARG = "expression_tokens"


def expression_target_blocks(unet: nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    """(name, block) for every BasicTransformerBlock with a cross-attention in down/up blocks."""
    targets = []
    for prefix in ("down_blocks", "up_blocks"):
        for name, module in getattr(unet, prefix).named_modules():
            if isinstance(module, BasicTransformerBlock) and module.attn2 is not None:
                targets.append((f"{prefix}.{name}", module))
    return targets


class ExpressionTokens(ModelMixin, ConfigMixin):
    """Linear map of the expression code (B, D) to ``num_tokens`` tokens (B, num_tokens, width)."""

    @register_to_config
    def __init__(self, expression_dim: int, num_tokens: int, width: int):
        super().__init__()
        self.num_tokens, self.width = num_tokens, width
        self.proj = nn.Linear(expression_dim, num_tokens * width)

    def forward(self, expression: torch.Tensor) -> torch.Tensor:
        if expression.dim() != 2 or expression.shape[1] != self.proj.in_features:
            raise ValueError(
                f"expression code must be (B, {self.proj.in_features}), got {tuple(expression.shape)}"
            )
        tokens = self.proj(expression.to(self.proj.weight.dtype))
        return tokens.view(expression.shape[0], self.num_tokens, self.width)


class ExpressionAttnProcessor:
    """Attention processor: the module's own attention plus, on a target ``attn2``, the
    expression attention over ``expression_tokens``.

    ``base`` is the processor the module had before (``AttnProcessor2_0``, i.e. SDPA, by default;
    the classic ``AttnProcessor`` honours ``upcast_attention``). Every attention module of the UNet
    gets one of these (without ``expression`` where there is nothing to add), so that the
    ``expression_tokens`` keyword is accepted everywhere instead of being warned about and
    dropped. ``expression`` is owned by :class:`ExpressionAttentionLayers`, not by the UNet: the
    UNet's state dict stays the frozen base model.
    """

    def __init__(self, base, expression: Attention | None = None):
        self.base = base
        self.expression = expression

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        expression_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                        attention_mask=attention_mask, temb=temb)
        if self.expression is None or expression_tokens is None:
            return out
        batch = hidden_states.shape[0]
        if expression_tokens.shape[0] != batch:  # e.g. a doubled batch; repeat the tokens
            expression_tokens = expression_tokens.repeat_interleave(batch // expression_tokens.shape[0], dim=0)
        layer = self.expression
        if not autocast.is_active(hidden_states.device.type):
            dtype = layer.to_q.weight.dtype  # the layer may be kept in another dtype than the UNet
            hidden_states, expression_tokens = hidden_states.to(dtype), expression_tokens.to(dtype)
        # Under autocast its projections cast for themselves: casting a bf16 UNet's hidden states to
        # the fp32 layer first would be an exact round trip (bf16 -> fp32 -> bf16) of a whole
        # activation, forward and backward, for the same result.
        extra = layer.processor(layer, hidden_states, encoder_hidden_states=expression_tokens)
        return out + extra.to(out.dtype)


def _base_processor(processor):
    return processor.base if isinstance(processor, ExpressionAttnProcessor) else processor


class ExpressionAttentionLayers(ModelMixin, ConfigMixin):
    """The extra attention layers, stored apart from the frozen UNet.

    Built from a UNet with :meth:`from_unet` (copies of its attn2, zero output); the config lists,
    per layer, the transformer block it serves (``names``) and the attention's shape.
    ``install(unet)`` sets :class:`ExpressionAttnProcessor` on the UNet's attention modules; the
    tokens are then passed per call in ``cross_attention_kwargs`` (:data:`TOKENS_KWARG`). Without
    tokens the UNet computes exactly the base model.
    """

    @register_to_config
    def __init__(self, names: list[str], query_dims: list[int], heads: list[int], dim_heads: list[int],
                 cross_attention_dim: int, bias: bool = False, out_bias: bool = True, upcast_attention: bool = False):
        super().__init__()
        if not (len(names) == len(query_dims) == len(heads) == len(dim_heads)) or not names:
            raise ValueError("names, query_dims, heads and dim_heads must be non-empty lists of equal length")
        self.names = list(names)
        self.layers = nn.ModuleList(
            Attention(query_dim=q, cross_attention_dim=cross_attention_dim, heads=h, dim_head=d, bias=bias,
                      out_bias=out_bias, upcast_attention=upcast_attention)
            for q, h, d in zip(query_dims, heads, dim_heads)
        )

    @classmethod
    def from_unet(cls, unet: nn.Module) -> "ExpressionAttentionLayers":
        """One layer per target block of ``unet``: a copy of its attn2 (weights, processor, head
        count, ``upcast_attention``) with a zero output projection."""
        targets = expression_target_blocks(unet)
        if not targets:
            raise ValueError("the UNet has no cross-attention transformer blocks in its down/up blocks")
        attns = [block.attn2 for _, block in targets]
        first = attns[0]
        layers = cls(
            names=[name for name, _ in targets],
            query_dims=[a.query_dim for a in attns],
            heads=[a.heads for a in attns],
            dim_heads=[a.inner_dim // a.heads for a in attns],
            cross_attention_dim=first.cross_attention_dim,
            bias=first.to_q.bias is not None,
            out_bias=first.to_out[0].bias is not None,
            upcast_attention=first.upcast_attention,
        )
        with torch.no_grad():
            for layer, attn in zip(layers.layers, attns):
                layer.load_state_dict(attn.state_dict())
                layer.set_processor(copy.deepcopy(_base_processor(attn.processor)))
                out = layer.to_out[0]
                nn.init.zeros_(out.weight)
                if out.bias is not None:
                    nn.init.zeros_(out.bias)
        return layers

    def __len__(self) -> int:
        return len(self.layers)

    def install(self, unet) -> None:
        """Wraps every attention processor of ``unet`` (replacing earlier expression processors)."""
        targets = [name for name, _ in expression_target_blocks(unet)]
        if targets != self.names:
            raise ValueError(f"these expression layers serve the blocks {self.names[:3]}... ({len(self.names)}), "
                             f"the UNet has {targets[:3]}... ({len(targets)}): not the UNet they were built for")
        by_name = {f"{name}.attn2.processor": layer for name, layer in zip(self.names, self.layers)}
        processors = unet.attn_processors
        unet.set_attn_processor({name: ExpressionAttnProcessor(_base_processor(proc), by_name.get(name))
                                 for name, proc in processors.items()})

    @staticmethod
    def uninstall(unet) -> None:
        """Restores the processors ``unet`` had before :meth:`install`."""
        unet.set_attn_processor({name: _base_processor(proc) for name, proc in unet.attn_processors.items()})

    def output_projections(self) -> Iterator[nn.Linear]:
        for layer in self.layers:
            yield layer.to_out[0]
