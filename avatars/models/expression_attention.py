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
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

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


class ExpressionTokens(nn.Module):
    """Linear map of the expression code (B, D) to ``num_tokens`` tokens (B, num_tokens, width)."""

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
        dtype = layer.to_q.weight.dtype  # the layer may be kept in another dtype than the UNet
        extra = layer.processor(layer, hidden_states.to(dtype), encoder_hidden_states=expression_tokens.to(dtype))
        return out + extra.to(out.dtype)


def _base_processor(processor):
    return processor.base if isinstance(processor, ExpressionAttnProcessor) else processor


class ExpressionAttentionLayers(nn.Module):
    """The extra attention layers, stored apart from the frozen UNet.

    ``install(unet)`` sets :class:`ExpressionAttnProcessor` on the UNet's attention modules;
    the tokens are then passed per call in ``cross_attention_kwargs`` (:data:`TOKENS_KWARG`).
    Without tokens the UNet computes exactly the base model.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        targets = expression_target_blocks(unet)
        if not targets:
            raise ValueError("the UNet has no cross-attention transformer blocks in its down/up blocks")
        self.names = [name for name, _ in targets]
        layers = []
        for _, block in targets:
            layer = copy.deepcopy(block.attn2)
            layer.set_processor(copy.deepcopy(_base_processor(block.attn2.processor)))
            out = layer.to_out[0]
            nn.init.zeros_(out.weight)
            if out.bias is not None:
                nn.init.zeros_(out.bias)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def install(self, unet) -> None:
        """Wraps every attention processor of ``unet`` (replacing earlier expression processors)."""
        by_name = {f"{name}.attn2.processor": layer for name, layer in zip(self.names, self.layers)}
        processors = unet.attn_processors
        missing = set(by_name) - set(processors)
        if missing:
            raise ValueError(f"the UNet has no attention processors {sorted(missing)[:3]}: not the UNet these layers were built for")
        unet.set_attn_processor({name: ExpressionAttnProcessor(_base_processor(proc), by_name.get(name))
                                 for name, proc in processors.items()})

    @staticmethod
    def uninstall(unet) -> None:
        """Restores the processors ``unet`` had before :meth:`install`."""
        unet.set_attn_processor({name: _base_processor(proc) for name, proc in unet.attn_processors.items()})

    def output_projections(self) -> Iterator[nn.Linear]:
        for layer in self.layers:
            yield layer.to_out[0]
