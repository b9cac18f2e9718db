"""The built-in GPT: a byte-level transformer language model, tensor- and pipeline-parallel.

One class, :class:`GPTStage`, builds any stage of any grid: with a tensor communicator of
size 1 and one stage it is the plain dense model. Every block draws its weights from its
own seeded generator and every parallel layer keeps its slice of the full weight, so a
split model starts equal to the dense one (docs/model-parallel.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from mpitrain.config_checks import GPT_DEFAULTS, LANGUAGE_MODELS, explicit_options
from mpitrain.parallel.checkpointing import apply_activation_checkpointing
from mpitrain.parallel.functional import copy_to_tp, gather_sequence
from mpitrain.parallel.tensor import (
    ColumnParallelLinear,
    Init,
    RowParallelLinear,
    VocabParallelEmbedding,
    merge_rules,
    normal_init,
    replicated_parameters,
    vocab_parallel_cross_entropy,
)

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig

STD = 0.02  # GPT-2's initialisation


@dataclass(frozen=True)
class GPTConfig:
    """The model's shape (TrainConfig fields: hidden, heads, layers, context)."""

    vocab: int = 256
    context: int = 128
    dim: int = 128
    heads: int = 4
    layers: int = 4
    sequence_parallel: bool = False
    seed: int = 0
    #: none | full | selective: each block checkpointed (mpitrain.parallel.checkpointing)
    activation_checkpointing: str = "none"

    @classmethod
    def from_train(cls, cfg: TrainConfig) -> GPTConfig:
        """Take the model options of a training config; the vocabulary is ``--data``'s
        (:func:`mpitrain.train.corpus.model_vocab` reads its manifest), else 256 bytes."""
        from mpitrain.train.corpus import model_vocab

        return cls(vocab=model_vocab(cfg), context=cfg.context, dim=cfg.hidden,
                   heads=cfg.heads, layers=cfg.layers,
                   sequence_parallel=cfg.sequence_parallel, seed=cfg.seed,
                   activation_checkpointing=cfg.activation_checkpointing)

    def parameters_count(self) -> int:
        """Parameters of the dense model (the head is tied to the embedding)."""
        d = self.dim
        block = 12 * d * d + 13 * d
        return self.vocab * d + self.context * d + self.layers * block + 2 * d


def stage_layers(layers: int, stages: int, stage: int) -> range:
    """The (global) block indices of ``stage``: contiguous, the first stages take the extras."""
    base, extra = divmod(layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def _gen(seed: int, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + index)
    return g


def qkv_init(tp: int, std: float = STD) -> Init:
    """Draw full q, k, v weights and lay them out so each tensor rank's slice holds
    (its q heads, its k heads, its v heads); with ``tp == 1`` that is [q; k; v]
    (the layer's ``interleave=3``)."""
    def init(t: torch.Tensor, gen: torch.Generator | None) -> None:
        d = t.shape[1]
        qkv = [torch.empty(d, d).normal_(0.0, std, generator=gen) for _ in range(3)]
        t.copy_(torch.cat([torch.cat([w.chunk(tp)[r] for w in qkv]) for r in range(tp)]))

    return init


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and MLP, each a column/row pair.

    One all-reduce per sub-block forward (the row layer) and one backward (the column
    layer's input); with sequence parallelism, an all-gather and a reduce-scatter instead.
    """

    def __init__(self, c: GPTConfig, tp: MPI.Intracomm, gen: torch.Generator) -> None:
        super().__init__()
        d, sp = c.dim, c.sequence_parallel
        self.heads = c.heads // tp.size
        self.head_dim = d // c.heads
        scaled = normal_init(STD / math.sqrt(2 * c.layers))
        self.ln1 = nn.LayerNorm(d)
        self.qkv = ColumnParallelLinear(d, 3 * d, tp, sequence_parallel=sp,
                                        init=qkv_init(tp.size), generator=gen,
                                        interleave=3)
        self.proj = RowParallelLinear(d, d, tp, sequence_parallel=sp, init=scaled, generator=gen)
        self.ln2 = nn.LayerNorm(d)
        self.fc = ColumnParallelLinear(d, 4 * d, tp, sequence_parallel=sp,
                                       init=normal_init(STD), generator=gen)
        self.out = RowParallelLinear(4 * d, d, tp, sequence_parallel=sp, init=scaled,
                                     generator=gen)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.qkv(self.ln1(h))
        b, t, _ = a.shape
        q, k, v = a.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        out: torch.Tensor = h + self.out(F.gelu(self.fc(self.ln2(h))))
        return out


class GPTStage(nn.Module):
    """Stage ``stage`` of ``stages`` of the GPT, split over the tensor group ``tp``.

    ``forward(x, targets)``: the first stage takes token ids (B, T) (or floats holding them),
    the others the previous stage's activation; the last stage returns the mean next-token
    cross-entropy over ``targets`` (B, T), the others their activation.
    """

    def __init__(self, c: GPTConfig, tp: MPI.Intracomm, stage: int = 0, stages: int = 1) -> None:
        super().__init__()
        self.c, self.tp = c, tp
        self.first, self.last = stage == 0, stage == stages - 1
        self.tied_across_stages = stages > 1
        sp = c.sequence_parallel
        if self.first:
            self.tok = VocabParallelEmbedding(c.vocab, c.dim, tp, sequence_parallel=sp,
                                              init=normal_init(STD), generator=_gen(c.seed, 0))
            self.pos = nn.Parameter(torch.empty(c.context, c.dim).normal_(
                0.0, STD, generator=_gen(c.seed, 1)))
        # global block indices as names: a checkpoint's keys do not depend on the grid
        self.blocks = nn.ModuleDict({
            str(i): Block(c, tp, _gen(c.seed, 2 + i)) for i in stage_layers(c.layers, stages, stage)
        })
        apply_activation_checkpointing(list(self.blocks.values()), c.activation_checkpointing)
        if self.last:
            self.ln_f = nn.LayerNorm(c.dim)
            if self.tied_across_stages:  # the same init as the first stage's embedding
                self.head = VocabParallelEmbedding(c.vocab, c.dim, tp, init=normal_init(STD),
                                                   generator=_gen(c.seed, 0))

    def _head(self) -> VocabParallelEmbedding:
        return self.head if self.tied_across_stages else self.tok

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        if self.first:
            tokens = x.long()
            h = self.tok(tokens)
            pos = self.pos[: tokens.shape[1]]
            if self.c.sequence_parallel:
                pos = pos.chunk(self.tp.size)[self.tp.rank]
            h = h + pos
        for block in self.blocks.values():
            h = block(h)
        if not self.last:
            return h
        if targets is None:
            raise ValueError("the last GPT stage needs the targets")
        h = self.ln_f(h)
        head = self._head()
        h = gather_sequence(h, self.tp) if self.c.sequence_parallel else copy_to_tp(h, self.tp)
        logits = F.linear(h, head.weight).float()  # the loss in float32 (under bf16 autocast)
        return vocab_parallel_cross_entropy(logits, targets.long(), self.tp, head.start).mean()

    def tied_parameters(self) -> list[nn.Parameter]:
        """Parameters another stage also holds (the embedding and the head)."""
        if not self.tied_across_stages:
            return []
        return [p for p in (getattr(self, "tok", None), getattr(self, "head", None))
                for p in ([p.weight] if p is not None else [])]

    def zero3_units(self) -> list[nn.Module]:
        """ZeRO-3's gather units: each block and the final norm. The token embedding stays
        with the root (always gathered): with one stage it is also the head, used again at
        the end of the forward."""
        units: list[nn.Module] = list(self.blocks.values())
        if self.last:
            units.append(self.ln_f)
        return units

    def tied_names(self) -> dict[str, str]:
        """Parameters that copy another stage's: name here -> name in the dense model."""
        return {"head.weight": "tok.weight"} if self.tied_across_stages and self.last else {}

    def sequence_parallel_parameters(self) -> list[nn.Parameter]:
        """Replicated parameters that see only this rank's part of the sequence."""
        if not self.c.sequence_parallel:
            return []
        return replicated_parameters(self)

    def merge_rules(self) -> dict[str, list[Any]]:
        """How each parameter's tensor slices join back (``mpitrain.checkpoint.reshard``)."""
        return merge_rules(self, drop=("head.",))


#: what --model gpt uses for the options the user did not set (docs/model-parallel.md)
DEFAULTS: dict[str, Any] = GPT_DEFAULTS


def gpt_defaults(cfg: TrainConfig) -> dict[str, Any]:
    """Return the :data:`DEFAULTS` changes for ``cfg`` (options the user set are kept)."""
    if cfg.model not in LANGUAGE_MODELS or not cfg.mode_defaults:
        return {}
    explicit = explicit_options(cfg)
    return {k: v for k, v in DEFAULTS.items() if k not in explicit and getattr(cfg, k) != v}
