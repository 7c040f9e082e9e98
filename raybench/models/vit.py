"""Vision Transformer from scratch: PatchEmbed -> Blocks (pre-norm attention + MLP) -> LayerNorm -> head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raybench.configs import ViTConfig
from raybench.models.registry import Complexity, Family, register


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x):  # (B, 3, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, fused: bool = True):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, T, hd)
        p = self.dropout if self.training else 0.0
        if fused:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # reference path, kept for the test that checks SDPA against plain softmax(QK^T)V
            att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            y = F.dropout(att.softmax(dim=-1), p) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(cfg.dim), Attention(cfg)
        self.norm2, self.mlp = nn.LayerNorm(cfg.dim), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.init_weights()

    def init_weights(self):
        # ViT's usual init (timm): truncated normal 0.02 for embeddings and linears, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, 3, H, W) -> (B, classes)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, N+1, dim)
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def build_vit(cfg: ViTConfig, weights: bool = True) -> ViT:
    """From scratch: `weights` changes nothing."""
    model = ViT(cfg)
    model.input_size, model.mean, model.std = cfg.image_size, None, None
    return model


def vit_complexity(c: ViTConfig) -> Complexity:
    D, H, N, C, P = c.dim, c.mlp_hidden, c.num_patches, c.num_classes, c.patch
    T = N + 1  # tokens: patches + class token
    block_params = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D)
    params = (3 * P * P * D + D) + D + T * D + c.depth * block_params + 2 * D + (D * C + C)
    macs = {
        "embed": N * 3 * P * P * D,
        "attn_qkv": c.depth * T * D * 3 * D,
        "attn_matmul": c.depth * 2 * T * T * D,  # QK^T and AV, summed over heads
        "attn_proj": c.depth * T * D * D,
        "mlp": c.depth * 2 * T * D * H,
        "head": D * C,
    }
    flops = {k: 2 * v for k, v in macs.items()}
    return Complexity(c.name, params, params, sum(flops.values()), c.image_size, flops)


register(Family(ViTConfig, build_vit, closed_form=vit_complexity, feature_dim=lambda c: c.dim,  # class token
                columns={"patch": lambda c: c.patch, "dim": lambda c: c.dim, "depth": lambda c: c.depth,
                         "heads": lambda c: c.heads, "mlp_ratio": lambda c: float(c.mlp_ratio)}))
