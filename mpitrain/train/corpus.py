"""The token corpus of a grid run: each data-parallel index's loaders over token windows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.errors import DataError, with_hint
from mpitrain.runtime.collective import agree
from mpitrain.train.gpt import GPTConfig

if TYPE_CHECKING:
    from mpitrain.config import TrainConfig
    from mpitrain.data import BatchLoader
    from mpitrain.parallel.grid import Grid
    from mpitrain.runtime.world import World


def open_corpus(
    cfg: TrainConfig, world: World, grid: Grid, batch: int
) -> tuple[BatchLoader, BatchLoader | None]:
    """Collective: open the token shards and this data-parallel index's loaders."""
    from mpitrain.data import BatchLoader, DistributedSampler, ShardedDataset, load_manifest
    from mpitrain.data.parallel_io import use_driver
    from mpitrain.train.builtin import ensure_corpus

    data_dir = Path(cfg.data) if cfg.data else ensure_corpus(world.comm, cfg.context)

    def open_data() -> tuple[Any, Any]:
        shape = load_manifest(data_dir).arrays["x"].shape  # before the token ids are read
        if shape != (cfg.context + 1,):
            raise DataError(with_hint(
                f"'{data_dir}' holds samples of shape {shape}; --model gpt "
                f"with --context {cfg.context} needs token windows of {cfg.context + 1}",
                f"write them with: python -m data_tools corpus --context {cfg.context}"))
        # token ids outside [0, vocab) are refused here (or in the batch that reads them,
        # for data too large to check at open), never as an IndexError in the embedding
        vocab = GPTConfig.from_train(cfg).vocab
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
