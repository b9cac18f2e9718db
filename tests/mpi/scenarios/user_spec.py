"""A user's own small language model and its spec: ``--model tests.mpi.scenarios.user_spec:spec``.

The model is plain PyTorch written for one process (nothing of mpitrain inside); the spec says
how to split it: a fused q/k/v projection by heads, the MLP's column/row pair, the vocabulary
of the embedding and the head, the head count to divide, and where the pipeline splits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mpitrain.config import TrainConfig
from mpitrain.parallel.convert import TensorPlan
from mpitrain.parallel.spec import ParallelSpec

VOCAB = 256


class Embed(nn.Module):
    def __init__(self, dim: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(context, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))  # type: ignore[no-any-return]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        return h + self.down(F.gelu(self.up(self.norm2(h))))  # type: ignore[no-any-return]


class TinyLM(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.embed = Embed(dim, context)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)


PLAN = TensorPlan({"embed.tok": "embedding", "blocks.*.qkv": "column-qkv",
                   "blocks.*.proj": "row", "blocks.*.up": "column", "blocks.*.down": "row",
                   "head": "head"}, divide=("blocks.*.heads",))


def spec(cfg: TrainConfig) -> ParallelSpec:
    """The spec: built lazily (on the meta device) from the run's shape options."""
    return ParallelSpec(
        name="tinylm", build=lambda: TinyLM(cfg.hidden, cfg.heads, cfg.layers, cfg.context),
        plan=PLAN, blocks="blocks", pre=("embed",), post=("norm", "head"),
        split_points=("blocks.1",) if cfg.pipeline_stages == 2 else (), seed=cfg.seed,
        meta={"model": "tinylm", "hidden": cfg.hidden, "layers": cfg.layers})


def bad_spec(cfg: TrainConfig) -> ParallelSpec:
    """A plan naming a layer the model lacks (refused on every rank, one line)."""
    good = spec(cfg)
    return ParallelSpec(name="bad", build=good.build, blocks="blocks", pre=good.pre,
                        post=good.post, plan=TensorPlan({**PLAN.layers, "blocks.*.fc9": "row"}))
