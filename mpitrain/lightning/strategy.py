"""``MPIStrategy``: Lightning's Trainer on mpitrain's MPI data parallelism and ZeRO.

    strategy = MPIStrategy(comm=comm, shard="gradients")      # collective: every rank
    trainer = lightning.Trainer(strategy=strategy, accelerator="cpu", max_epochs=10)
    trainer.fit(model, datamodule=dm)                          # mpiexec -n N python train.py

What Lightning asks of a strategy maps onto mpitrain as follows (docs/lightning.md):

- ranks, nodes, local ranks: :class:`MPIClusterEnvironment` over ``World.create`` (MPI's
  shared-memory split), decided once when the strategy is built;
- the gradient exchange: ``mpitrain.DataParallel`` (``shard="none"``) or
  ``ShardedDataParallel`` (ZeRO-1/2/3), its buckets reduced during backward and waited for
  in :meth:`MPIStrategy.post_backward`; Lightning's gradient accumulation runs the first
  micro-batches under the exchange's ``no_sync``;
- ``reduce`` / ``all_gather`` / ``broadcast`` / ``barrier`` (``self.log(sync_dist=True)``,
  callbacks) and torchmetrics' state sync: MPI collectives on the strategy's communicator;
- the data: Lightning injects torch's ``DistributedSampler`` with MPI's rank and size (the
  order Lightning's DDP gives);
- checkpoints: :mod:`mpitrain.lightning.checkpoint` (plain files, or ZeRO directories that
  resume on any number of ranks), restored after the model is wrapped;
- preemption: :mod:`mpitrain.lightning.preempt` (agreed stop, ``hpc_ckpt_N.ckpt``, exit 99);
- failure: an exception on any rank aborts the whole job (``on_exception``) instead of
  leaving the other ranks waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device, _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import Tensor

from mpitrain.errors import CheckpointError, ConfigError, MpitrainError, with_hint
from mpitrain.grad.parallel import DataParallel
from mpitrain.grad.zero.wrapper import ShardedDataParallel
from mpitrain.lightning import checkpoint as ckpt
from mpitrain.lightning.collectives import (
    all_gather,
    all_gather_with_grad,
    broadcast_object,
    reduce_,
    refuse_group,
    route_metrics,
)
from mpitrain.lightning.environment import MPIClusterEnvironment
from mpitrain.lightning.exchange import (
    build_exchange,
    refuse_unsupported,
    shard_optimizers,
    unwrap,
)
from mpitrain.lightning.options import MPIOptions
from mpitrain.lightning.precision import check_plugin, routes_scaler, scaled_optimizer_step
from mpitrain.lightning.preempt import Preemption, PreemptionCallback
from mpitrain.runtime.watchdog import Watchdog
from mpitrain.runtime.world import World

if TYPE_CHECKING:
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.plugins.precision import Precision
    from mpi4py import MPI

    from mpitrain.grad.protocol import ExchangeBase


class MPIStrategy(ParallelStrategy):
    """Data-parallel training over MPI for ``lightning.Trainer`` (launched by mpiexec).

    Building it is collective (every rank, at the same point): it duplicates ``comm`` and
    learns the node layout. ``Trainer(devices=..., num_nodes=...)`` may stay at 1 and 1 (the
    layout comes from MPI) or must describe the launch (ranks per node, nodes).

    Args:
        shard: ``"none"`` (replicas, ``mpitrain.DataParallel``), ``"optimizer"``,
            ``"gradients"`` or ``"parameters"`` (ZeRO-1/2/3, as ``--shard``).
        bucket_mb: gradient bucket size in MiB (default: the engine's).
        compression: ``none``, ``fp16``, ``bf16`` (and ``fp16-ef``/``bf16-ef`` without
            sharding): the type gradients travel in.
        allreduce: ``auto`` (hierarchical across real nodes with several ranks each),
            ``flat`` or ``hierarchical``, as ``--allreduce``.
        cuda_aware: ``auto``, ``yes`` or ``no``: hand device buffers to MPI (GPUs).
        preempt_signals: signals that stop the run with a checkpoint and exit code 99
            (default ``"USR1,TERM"``; ``""`` leaves signals to Lightning).
        hang_timeout: seconds a training batch (to its optimizer step) may take before the
            hang watchdog names the late ranks and aborts the job (as ``--hang-timeout``);
            None: no watchdog.
        comm: the communicator (default: a duplicate of ``MPI.COMM_WORLD``; pass the one
            ``mpitrain.runtime.abort.run_mpi`` hands your ``main``).
        accelerator, checkpoint_io, precision_plugin: as for any Lightning strategy.
    """

    strategy_name = "mpi"

    def __init__(
        self,
        *,
        shard: str = "none",
        bucket_mb: float | None = None,
        compression: str = "none",
        allreduce: str = "auto",
        cuda_aware: str = "auto",
        preempt_signals: str = "USR1,TERM",
        hang_timeout: float | None = None,
        comm: MPI.Intracomm | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        self.options = MPIOptions(shard=shard, bucket_mb=bucket_mb, compression=compression,
                                  allreduce=allreduce, cuda_aware=cuda_aware,
                                  preempt_signals=preempt_signals, hang_timeout=hang_timeout)
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        #: the job's ranks and nodes; ``world.comm`` (own duplicate) carries the collectives
        self.world = World.create(comm)
        #: ranks on each rank's node, in rank order (the same list on every rank)
        self.local_sizes: list[int] = self.world.comm.allgather(self.world.local_size)
        super().__init__(accelerator=accelerator, parallel_devices=None,
                         cluster_environment=MPIClusterEnvironment(self.world),
                         checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        self._num_nodes = 1
        self._exchange: ExchangeBase | None = None
        self._sync_grads = True
        self._interrupted = False
        #: optimizers of a finished ZeRO fit: they hold this rank's shards only
        self._sharded_leftovers: list[torch.optim.Optimizer] = []
        self.preemption = Preemption(self.options.signals(), self.world.comm)
        #: the hang watchdog of a fit (armed per training batch; ``hang_timeout``)
        self._watchdog = Watchdog.off(self.world.comm)

    # ---- the job's layout ------------------------------------------------------------------
    @property
    def root_device(self) -> torch.device:
        """This rank's device: ``Trainer(devices=N)``'s entry for its local rank; with one
        GPU listed and several ranks on a node that see several GPUs, GPU ``local_rank``."""
        devices = self.parallel_devices or [torch.device("cpu")]
        if len(devices) > 1:
            return devices[self.world.local_rank]
        dev = devices[0]
        if dev.type == "cuda" and self.world.local_size > 1 and \
                torch.cuda.device_count() >= self.world.local_size:
            return torch.device("cuda", self.world.local_rank)
        return dev

    @property
    def num_nodes(self) -> int:
        """``Trainer(num_nodes=...)`` (checked against MPI's layout)."""
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def is_distributed(self) -> bool:
        """Lightning injects a DistributedSampler for strategies that say so."""
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """MPI's rank and size: each rank reads its 1/N of every epoch, as under DDP."""
        return {"num_replicas": self.world.size, "rank": self.world.rank}

    def set_world_ranks(self) -> None:
        """Check ``Trainer(devices, num_nodes)`` against the launch; set the rank-zero rank."""
        # one function object behind Lightning's and lightning_utilities' rank_zero_only
        rank_zero_only.rank = self.world.rank  # type: ignore[attr-defined]
        devices = len(self.parallel_devices or [None])
        w = self.world
        if (devices == 1 or all(s == devices for s in self.local_sizes)) and \
                self._num_nodes in (1, w.num_nodes):
            return
        per_node = sorted(set(self.local_sizes))
        raise ConfigError(with_hint(
            f"Trainer(devices={devices}, num_nodes={self._num_nodes}) does not describe this "
            f"launch: {w.size} MPI ranks on {w.num_nodes} node(s), "
            f"{'/'.join(map(str, per_node))} per node",
            f"pass devices={per_node[-1]}, num_nodes={w.num_nodes} (or leave both at 1: "
            "MPIStrategy takes the layout from MPI)"))

    def setup_environment(self) -> None:
        """Bind the device; re-seed like DDP does (``seed_everything``'s seed, if any)."""
        super().setup_environment()
        reset_seed()

    def model_to_device(self) -> None:
        """Move the module to this rank's device."""
        assert self.model is not None
        self.model.to(self.root_device)

    # ---- setting up a fit ------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        """Collective: wrap the module in the exchange (fit) or align it with rank 0's."""
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self._interrupted = False
        fitting = trainer.state.fn == TrainerFn.FITTING
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        module = self.lightning_module
        assert module is not None
        route_metrics(module, self.world.comm)
        if fitting:
            default_clip = type(module).configure_gradient_clipping is \
                pl.LightningModule.configure_gradient_clipping
            refuse_unsupported(
                self.options.stage, clip_norm=bool(trainer.gradient_clip_val) and default_clip
                and trainer.gradient_clip_algorithm in (None, "norm"),
                layer_sync=self._layer_sync is not None)
            check_plugin(self.precision_plugin, self.options.stage)
            self._sharded_leftovers = []  # this fit builds new optimizers
            self._exchange = build_exchange(module, self.world, self.root_device, self.options)
            self.model = self._exchange
            self.setup_optimizers(trainer)
            if isinstance(self._exchange, ShardedDataParallel):
                shard_optimizers(self.optimizers, self._exchange, module)
            self._add_preemption(trainer)
            if self.options.hang_timeout is not None:  # Collective: dups the communicator
                self._watchdog.close()
                self._watchdog = Watchdog.create(self.world.comm, self.options.hang_timeout)
        else:
            from mpitrain.grad.broadcast import broadcast_parameters

            broadcast_parameters(module, self.world.comm, root=0)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _add_preemption(self, trainer: pl.Trainer) -> None:
        callbacks: list[pl.Callback] = trainer.callbacks  # type: ignore[attr-defined]
        if not self.preemption.flag.signals or any(
                isinstance(c, PreemptionCallback) for c in callbacks):
            return
        at = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)),
                  len(callbacks))
        callbacks.insert(at, PreemptionCallback(self.preemption))

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Checkpoints load into the wrapped model (ZeRO's shards exist only then)."""
        return True

    # ---- the step --------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Arm the hang watchdog for this batch (disarmed after the optimizer step)."""
        self._watchdog.step_started(batch_idx)
        super().on_train_batch_start(batch, batch_idx)

    def pre_backward(self, closure_loss: Tensor) -> None:
        """Point ``.grad`` back at the gradient buckets: Lightning's ``optimizer.zero_grad()``
        runs between forward and backward and sets them to None, and autograd would then
        allocate fresh gradients for the engine to copy in (one memset instead)."""
        if isinstance(self._exchange, DataParallel):
            self._exchange.engine.attach_grads()

    def post_backward(self, closure_loss: Tensor) -> None:
        """Collective: wait for this step's gradient exchange (not inside accumulation)."""
        if self._exchange is not None and self._sync_grads:
            self._exchange.synchronize()

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Accumulate gradients locally for the backward passes inside (no communication)."""
        if self._exchange is None:
            yield None
            return
        self._sync_grads = False
        try:
            with self._exchange.no_sync():
                yield None
        finally:
            self._sync_grads = True

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Any,
                       model: pl.LightningModule | torch.nn.Module | None = None,
                       **kwargs: Any) -> Any:
        """Collective: step through the precision plugin (the closure runs forward, backward
        and the exchange; fp16's GradScaler unscales through the exchange, so an overflow in
        any rank's shard skips every rank's step); ZeRO then all-gathers the new parameters."""
        plugin = self.precision_plugin
        if self._exchange is not None and routes_scaler(plugin):
            assert isinstance(plugin, MixedPrecision)
            module = model if isinstance(model, pl.LightningModule) else self.lightning_module
            assert module is not None
            out = scaled_optimizer_step(plugin, self._exchange, optimizer, module, closure,
                                        **kwargs)
        else:
            out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if isinstance(self._exchange, ShardedDataParallel):
            self._exchange.gather_parameters()
            self._exchange.zero_grad()
        self._watchdog.step_done()
        return out

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Collective: clip the gradients to a global 2-norm of ``max_norm`` (under ZeRO call
        it from ``configure_gradient_clipping``); returns the norm before clipping."""
        if self._exchange is None:
            raise ConfigError("MPIStrategy.clip_grad_norm_ is for the training step of a fit")
        return self._exchange.clip_grad_norm_(max_norm)

    # ---- collectives ------------------------------------------------------------------------
    def reduce(self, tensor: Tensor | Any, group: Any | None = None,
               reduce_op: Any | None = "mean") -> Tensor | Any:
        """Collective: reduce ``tensor`` in place over every rank (non-tensors pass through)."""
        if not isinstance(tensor, Tensor):
            return tensor
        refuse_group(group, "reduce")
        return reduce_(tensor, self.world.comm, reduce_op)

    def all_gather(self, tensor: Tensor, group: Any | None = None,
                   sync_grads: bool = False) -> Tensor:
        """Collective: every rank's ``tensor`` stacked (gradients flow with ``sync_grads``)."""
        refuse_group(group, "all_gather")
        if sync_grads:
            return all_gather_with_grad(tensor, self.world.comm)
        return all_gather(tensor, self.world.comm)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Collective: rank ``src``'s ``obj`` on every rank."""
        return broadcast_object(obj, self.world.comm, src)

    def barrier(self, name: str | None = None) -> None:
        """Collective: wait until every rank arrives."""
        self.world.comm.Barrier()

    # ---- checkpoints -----------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state (ZeRO: empty here; the shard files hold it)."""
        if isinstance(self._exchange, ShardedDataParallel):
            return {}
        return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        """The optimizer's state (ZeRO: empty here; the shard files hold it)."""
        if isinstance(self._exchange, ShardedDataParallel):
            return {}
        if any(optimizer is o for o in self._sharded_leftovers):
            raise CheckpointError(with_hint(
                "the optimizer of the finished fit holds this rank's ZeRO shard only, so a "
                "checkpoint saved now could not resume it",
                "save during the fit (ModelCheckpoint; the preemption checkpoint), or "
                "trainer.save_checkpoint(path, weights_only=True) for the weights"))
        return super().optimizer_state(optimizer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any | None = None) -> None:
        """Collective: ZeRO: a sharded directory at ``filepath``; replicas: rank 0 writes
        the file atomically (through a custom ``checkpoint_io`` when one was given)."""
        if isinstance(self._exchange, ShardedDataParallel):
            ckpt.save_sharded_checkpoint(checkpoint, Path(filepath), self._exchange,
                                         self.optimizers[0])
        elif self._plain_io() and storage_options is None and "://" not in str(filepath):
            ckpt.save_plain(checkpoint, Path(filepath), self.world.comm)
        elif self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options)

    def _plain_io(self) -> bool:
        return type(self.checkpoint_io) is TorchCheckpointIO

    def load_checkpoint(self, checkpoint_path: Any,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Collective: read a plain file or a sharded directory on every rank (a failure on
        any rank raises the same CheckpointError on all)."""
        return ckpt.load_any(checkpoint_path, self.world.comm,
                             ckpt.reader(self.checkpoint_io, weights_only))

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Collective: load the module's state from a plain or sharded checkpoint, into
        either mode (ZeRO-3 gathers the root's own parameters)."""
        module = self.lightning_module
        assert module is not None
        if not ckpt.load_module_state(self._exchange, module, checkpoint, strict=strict):
            super().load_model_state_dict(checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """Collective: load the optimizer's state from a plain or sharded checkpoint, into
        either mode."""
        module = self.lightning_module
        assert module is not None
        if not ckpt.load_optimizer_state(self._exchange, module, self.optimizers, checkpoint):
            super().load_optimizer_state_dict(checkpoint)
            return
        for opt in self.optimizers:
            _optimizer_to_device(opt, self.root_device)

    # ---- the end ---------------------------------------------------------------------------
    def on_exception(self, exception: BaseException) -> None:
        """Abort the whole job on an unexpected error: the other ranks may be waiting in a
        collective this rank will never reach (agreed stops and MpitrainErrors just end)."""
        self._interrupted = True
        if isinstance(exception, SystemExit | KeyboardInterrupt | MpitrainError) or \
                self.world.size == 1:
            return
        from mpitrain.runtime.abort import abort

        abort(self.world.comm, exception)

    def teardown(self) -> None:
        """Collective (after a normal end; local after an exception): detach the exchange,
        give ZeRO-3's module its full parameters back, release Lightning's resources."""
        ex, self._exchange = self._exchange, None
        if isinstance(ex, ShardedDataParallel):
            self._sharded_leftovers = list(self.optimizers)
        if ex is not None:
            unwrap(ex, collective=not self._interrupted)
            self.model = self.lightning_module
        self.preemption.stop()
        self._watchdog.close()
        super().teardown()
