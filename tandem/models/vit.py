"""A small Vision Transformer with torchvision-compatible state-dict keys."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from tandem.models.common import check_common_args
from tandem.models.registry import register_model
from tandem.widths import scale_channels

# ViT-S/16 (as in DeiT-S): torchvision has no "small" variant, so these follow the paper.
_HIDDEN_DIM = 384
_MLP_DIM = 1536
_LAYER_NORM_EPS = 1e-6


class MLPBlock(nn.Sequential):
    """Linear, GELU, dropout, linear, dropout; children named 0-4 as in torchvision."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float) -> None:
        """Build the block."""
        super().__init__(
            nn.Linear(dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                # A near-zero bias keeps the residual stream dominant at the start of training.
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: self-attention then MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        """Build the block."""
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.mlp = MLPBlock(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to a (batch, tokens, dim) tensor."""
        y = self.ln_1(x)
        # Indexing rather than tuple-unpacking keeps the block symbolically traceable.
        y = self.self_attention(y, y, y, need_weights=False)[0]
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Position embedding, a stack of encoder blocks, and a final layer norm."""

    def __init__(
        self, seq_length: int, depth: int, dim: int, heads: int, mlp_dim: int, dropout: float
    ) -> None:
        """Build the encoder for sequences of ``seq_length`` tokens."""
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim))
        nn.init.normal_(self.pos_embedding, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            OrderedDict(
                (f"encoder_layer_{i}", EncoderBlock(dim, heads, mlp_dim, dropout))
                for i in range(depth)
            )
        )
        self.ln = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a (batch, tokens, dim) tensor."""
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding, class token, encoder, linear head on the class token."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        depth: int,
        heads: int,
        hidden_dim: int,
        mlp_dim: int,
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        """Build the network for square ``image_size`` inputs cut into square patches."""
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch_size}")
        if hidden_dim % heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by heads {heads}")
        self.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(seq_length, depth, hidden_dim, heads, mlp_dim, dropout)
        head = nn.Linear(hidden_dim, num_classes)
        self.heads = nn.Sequential(OrderedDict(head=head))
        # LeCun-normal patch embedding, as torchvision does.
        fan_in = in_channels * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1.0 / fan_in))
        assert self.conv_proj.bias is not None  # built with a bias; narrows the type
        nn.init.zeros_(self.conv_proj.bias)
        # torchvision zeroes the head; a small random one keeps the logits input-dependent.
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images."""
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        x = self.encoder(torch.cat([cls, x], dim=1))
        return self.heads(x[:, 0])


@register_model("vit_small")
def vit_small(
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    width: float = 1.0,
    small_input: bool = False,
    image_size: int | None = None,
    patch_size: int | None = None,
    depth: int = 12,
    heads: int = 6,
    dropout: float = 0.0,
) -> VisionTransformer:
    """Build a ViT-S: 384 hidden, 1536 MLP, 6 heads, 12 layers at width 1.

    ``small_input`` switches the defaults to 32x32 images and 4x4 patches. ``width`` scales the
    hidden and MLP sizes; the hidden size stays a multiple of ``heads``.
    """
    check_common_args(num_classes, in_channels, width)
    if heads < 1 or depth < 0:
        raise ValueError(f"need heads >= 1 and depth >= 0, got heads={heads}, depth={depth}")
    if image_size is None:
        image_size = 32 if small_input else 224
    if patch_size is None:
        patch_size = 4 if small_input else 16
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        depth=depth,
        heads=heads,
        hidden_dim=heads * scale_channels(_HIDDEN_DIM, width / heads),
        mlp_dim=scale_channels(_MLP_DIM, width),
        num_classes=num_classes,
        in_channels=in_channels,
        dropout=dropout,
    )
