"""Expression conditioning: expression code -> tokens, plus one extra cross-attention per
transformer block of the UNet's down and up blocks.

Each extra attention reads the same normalised hidden states as the block's ``attn2`` and its
output is added to ``attn2``'s output (a forward hook on ``attn2``), so it lands in the same
residual branch. It starts as a copy of that ``attn2`` (query, key and value projections) with a
zero output projection: at step 0 the pretrained UNet is unchanged. The frozen ``attn2`` keeps
attending to the stored empty-prompt embedding.

The mid block is left out: the paper counts 15 layers on SD2.1 (6 down + 9 up), and the
mid block already receives the ControlNet's mid residual, which carries the per-pixel signal.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from diffusers.models.attention import BasicTransformerBlock


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


class ExpressionAttentionLayers(nn.Module):
    """The extra attention layers, stored apart from the frozen UNet.

    ``attach(unet)`` registers the hooks; tokens are set per forward pass with
    :meth:`conditioned` (a context manager). Without tokens the hooks do nothing.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        targets = expression_target_blocks(unet)
        if not targets:
            raise ValueError("the UNet has no cross-attention transformer blocks in its down/up blocks")
        self.names = [name for name, _ in targets]
        layers = []
        for _, block in targets:
            layer = copy.deepcopy(block.attn2)  # before any hook is registered on attn2
            layer._forward_hooks.clear()
            out = layer.to_out[0]
            nn.init.zeros_(out.weight)
            if out.bias is not None:
                nn.init.zeros_(out.bias)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self._tokens: torch.Tensor | None = None
        self._attached: list[nn.Module] = []  # plain list: the attn2 modules are not our children

    def __len__(self) -> int:
        return len(self.layers)

    def attach(self, unet: nn.Module) -> None:
        """Registers one forward hook per target ``attn2`` (replacing earlier ones of this owner)."""
        self.detach()
        for (_, block), layer in zip(expression_target_blocks(unet), self.layers):
            block.attn2.register_forward_hook(_ExpressionHook(self, layer), with_kwargs=True)
            self._attached.append(block.attn2)

    def detach(self) -> None:
        """Removes this owner's hooks. Hooks are found by type rather than through handles, so
        this also works on a ``copy.deepcopy`` of the model (whose hooks, being objects, are
        copied along with the layers they point to)."""
        for attn in self._attached:
            for key, hook in list(attn._forward_hooks.items()):
                if isinstance(hook, _ExpressionHook) and hook.owner is self:
                    del attn._forward_hooks[key]
                    attn._forward_hooks_with_kwargs.pop(key, None)
        self._attached = []

    class _Context:
        def __init__(self, owner: "ExpressionAttentionLayers", tokens: torch.Tensor | None):
            self.owner, self.tokens = owner, tokens

        def __enter__(self):
            self.previous = self.owner._tokens
            self.owner._tokens = self.tokens

        def __exit__(self, *exc):
            self.owner._tokens = self.previous

    def conditioned(self, tokens: torch.Tensor | None) -> "ExpressionAttentionLayers._Context":
        return ExpressionAttentionLayers._Context(self, tokens)

    def output_projections(self) -> Iterator[nn.Linear]:
        for layer in self.layers:
            yield layer.to_out[0]


class _ExpressionHook:
    """Forward hook on a block's ``attn2``: adds the expression attention's output."""

    def __init__(self, owner: ExpressionAttentionLayers, layer: nn.Module):
        self.owner, self.layer = owner, layer

    def __call__(self, module, args, kwargs, output):
        tokens = self.owner._tokens
        if tokens is None:
            return output
        hidden = args[0] if args else kwargs["hidden_states"]
        batch = hidden.shape[0]
        if tokens.shape[0] != batch:  # e.g. a doubled batch; repeat the tokens
            tokens = tokens.repeat_interleave(batch // tokens.shape[0], dim=0)
        dtype = self.layer.to_q.weight.dtype  # the layer may be kept in another dtype than the UNet
        extra = self.layer(hidden.to(dtype), encoder_hidden_states=tokens.to(dtype))
        return output + extra.to(output.dtype)
