"""A decoder-style transformer with one causal attention head per layer, cut into blocks.

Shapes: tokens ``[B, T]``; residual stream ``[B, T, D]``. Block 0 embeds the tokens
(token + learned position embeddings); every block runs ``layers_per_block`` pre-norm
layers and reads its residual stream as the mean of the latent z_k (the paper's
transformer puts a local loss after every layer: ``layers_per_block = 1``). Families with
more than one parameter per channel get the extra parameters from a linear readout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_bll.families import Family
from pyro_bll.models.errors import ModelError


class CausalSelfAttention(nn.Module):
    """Single-head causal self-attention, ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # each [B, 1, T, D]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, 1, T, D]
        return self.proj(out.squeeze(1))


class TransformerLayer(nn.Module):
    """h + attn(LN(h)), then h + MLP(LN(h)) with a 4x GELU MLP."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class ParamReadout(nn.Module):
    """``[B, T, D] -> [B, T, n_raw * D]``: the stream is the mean; extra params are linear."""

    def __init__(self, d_model: int, family: Family) -> None:
        super().__init__()
        extra = family.raw_size(d_model) - d_model
        self.extra = nn.Linear(d_model, extra) if extra > 0 else None

    def forward(self, h: Tensor) -> Tensor:
        return h if self.extra is None else torch.cat([h, self.extra(h)], dim=-1)


class TransformerBlock(nn.Module):
    """One BLL block: optional embedding, ``n_layers`` layers, parameter readout."""

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        family: Family,
        vocab: int = 0,
        max_len: int = 0,
        params_input: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model) if vocab else None
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, d_model)) if vocab else None
        self.layers = nn.Sequential(*(TransformerLayer(d_model) for _ in range(n_layers)))
        self.readout = ParamReadout(d_model, family)
        self.family = family
        # --propagate params: the previous block's alpha in unconstrained coordinates
        # [B, T, n_raw * D], projected to the stream width when the family has more than one
        # parameter per channel
        width = family.raw_size(d_model)
        project = params_input and width != d_model and not vocab
        self.inproj = nn.Linear(width, d_model) if project else None
        if self.inproj is not None and family.unconstrained_is_raw:
            # start as [I, 0]: the unconstrained coordinates begin with the previous block's
            # stream (the first D raw features, ``ParamReadout``), so an untrained stack is
            # one residual stream, as it is for the one-parameter families, where a random
            # projection would mix it anew at every block boundary
            with torch.no_grad():
                self.inproj.weight.zero_()
                self.inproj.weight[:, :d_model].copy_(torch.eye(d_model))
                self.inproj.bias.zero_()

    def forward(self, inp: Tensor | tuple[Tensor, ...]) -> Tensor:
        if isinstance(inp, tuple):  # alpha of the previous block (--propagate params)
            inp = self.family.unconstrained(inp)  # [B, T, n_raw * D]
            if self.inproj is not None:
                inp = self.inproj(inp)  # [B, T, D]
        if self.embed is not None:
            t = inp.shape[1]
            inp = self.embed(inp) + self.pos[:t]  # [B, T, D]
        return self.readout(self.layers(inp))


def transformer_blocks(
    vocab: int,
    max_len: int,
    d_model: int,
    layers: int,
    blocks: int,
    family: Family,
    params_input: bool = False,
) -> list[nn.Module]:
    """``blocks`` groups of ``layers // blocks`` layers; the first one embeds tokens.

    ``params_input``: blocks after the first read the previous block's parameters
    (``--propagate params``) rather than its mean.
    """
    if blocks <= 0 or layers <= 0 or layers % blocks:
        raise ModelError("blocks", f"({blocks}) must be positive and divide the layers ({layers})")
    per = layers // blocks
    return [
        TransformerBlock(d_model, per, family, vocab if k == 0 else 0, max_len, params_input)
        for k in range(blocks)
    ]
