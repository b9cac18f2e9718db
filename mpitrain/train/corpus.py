"""The token corpus of a grid run: its vocabulary, and each data-parallel index's loaders over
token windows (the built-in corpus, or ``--data`` from ``data_tools tokenize``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.errors import DataError, with_hint
from mpitrain.runtime.collective import agree

if TYPE_CHECKING:
    from mpitrain.config import TrainConfig
    from mpitrain.data import BatchLoader
    from mpitrain.parallel.grid import Grid
    from mpitrain.runtime.world import World


def model_vocab(cfg: TrainConfig) -> int:
    """The vocabulary a language model of ``cfg`` embeds: the one ``--data``'s manifest
    declares (``params.vocab``: ``data_tools tokenize`` or ``convert --vocab``), else 256
    (bytes: the built-in corpus). Reads the manifest: call it where the ranks agree.

    Raises:
        DataError: ``--data`` has no readable manifest, or ``--tensor-parallel`` does not
            divide the vocabulary (each tensor rank embeds an equal range of it).
    """
    from mpitrain.data import load_manifest
    from mpitrain.data.tokens import BYTE_VOCAB, declared_vocab

    if not cfg.data:
        return BYTE_VOCAB
    vocab = declared_vocab(load_manifest(cfg.data), Path(cfg.data)) or BYTE_VOCAB
    tp = cfg.tensor_parallel
    if vocab % tp:
        raise DataError(with_hint(
            f"--tensor-parallel {tp} does not divide the {vocab}-token vocabulary of "
            f"'{cfg.data}' (each tensor rank embeds an equal part of it)",
            f"re-tokenize with a --vocab-size that {tp} divides (e.g. "
            f"{vocab + tp - vocab % tp}), or change --tensor-parallel"))
    return vocab


def open_corpus(
    cfg: TrainConfig, world: World, grid: Grid, batch: int, vocab: int = 256
) -> tuple[BatchLoader, BatchLoader | None]:
    """Collective: open the token shards and this data-parallel index's loaders; ``vocab``:
    the model's (its spec's ``meta["vocab"]``), which every token id must be below."""
    from mpitrain.data import BatchLoader, DistributedSampler, ShardedDataset, load_manifest
    from mpitrain.data.parallel_io import use_driver
    from mpitrain.train.builtin import ensure_corpus

    data_dir = Path(cfg.data) if cfg.data else ensure_corpus(world.comm, cfg.context)

    def open_data() -> tuple[Any, Any]:
        shape = load_manifest(data_dir).arrays["x"].shape  # before the token ids are read
        if shape != (cfg.context + 1,):
            what = f"windows of {shape[0]} tokens" if len(shape) == 1 else f"samples of {shape}"
            raise DataError(with_hint(
                f"'{data_dir}' holds {what}; --model {cfg.model} "
                f"with --context {cfg.context} needs token windows of {cfg.context + 1}",
                f"train with --context {shape[0] - 1}, or write windows for this context: "
                f"python -m data_tools tokenize TEXT --context {cfg.context} --out DIR"
                if len(shape) == 1 and shape[0] > 1 else
                f"write token windows: python -m data_tools tokenize TEXT --context "
                f"{cfg.context} --out DIR"))
        # token ids outside [0, vocab) are refused here (or in the batch that reads them,
        # for data too large to check at open), never as an IndexError in the embedding
        train = ShardedDataset(data_dir, split=cfg.train_split, tokens=vocab)
        test = (ShardedDataset(data_dir, split=cfg.test_split, tokens=vocab)
                if cfg.test_split else None)
        return train, test

    train_ds, test_ds = agree(world.comm, open_data)
    use_driver(cfg.hdf5_driver, cfg.prefetch, (train_ds, test_ds), world.comm)
    sampler = DistributedSampler(len(train_ds), grid.dp_rank, grid.data, seed=cfg.seed,
                                 shuffle=cfg.shuffle, drop_last=True,
                                 chunk=train_ds.block_samples)
    agree(world.comm, lambda: sampler.check_batch(batch))
    train = BatchLoader(train_ds, sampler, batch, prefetch=cfg.prefetch)
    test = None
    if test_ds is not None:
        ts = DistributedSampler(len(test_ds), grid.dp_rank, grid.data, seed=cfg.seed,
                                shuffle="none", drop_last=False)
        test = BatchLoader(test_ds, ts, max(64, batch), prefetch=1)
    return train, test
