"""Multi-process training: each data-parallel rank's share of the batches, the model-parallel
strategy armodal's trainer configs name, and a check that all ranks write one run.

Per-rank data. Lightning's own DistributedSampler injection rebuilds a DataLoader around a new
sampler, which armodal's ResumableLoader (armodal/resume.py) does not survive, and whose
shuffle would give another data order than one process. train() turns it off
(use_distributed_sampler=False) and shard_train_data gives every rank a RankShard of the
loader's own sampler instead: each rank draws the whole epoch order from the same seeded
generator and keeps every n-th index, so the n ranks' batches of one step together are the
batch one process reads at n times the batch size, and a checkpoint's loader state (the
generator at the epoch's start, batches done) means the same under any number of ranks:
resume=auto continues exactly from a DDP checkpoint in one process and the other way round, at
the same global batch. (Each rank's loss is the mean over its own learned targets and DDP
averages the ranks' gradients: with loss masks or padding, where ranks learn different numbers
of targets, that weighs targets a little differently from one process.) Validation is not
sharded: every rank runs the whole (capped) val split and ARModule sums its figures over ranks,
so val loss equals the one-process figure exactly (the counts scale alike) and the ranks'
collectives stay in step under FSDP / TP; it does not get faster with more ranks.
"""

from __future__ import annotations

import functools
import os
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import Sampler

from armodal.resume import ResumableLoader

__all__ = ["ModelParallel", "RankShard", "SameRunDir", "check_launch", "launcher_rank",
           "shard_train_data", "shards_model"]


class RankShard(Sampler[int]):
    """Rank `rank` of `num_replicas`: positions rank, rank + n, rank + 2n, ... of `sampler`'s
    order, len(sampler) // n of them.

    With a per-rank batch of b, the k-th batches of the n ranks hold exactly positions
    [k n b, (k + 1) n b) of the order: one process's k-th batch at batch size n b. The whole
    order is drawn up front, once per epoch, so the sampler's generator ends each epoch where
    one process's does, on every rank."""

    def __init__(self, sampler: Sampler[int], rank: int, num_replicas: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.sampler, self.rank, self.num_replicas = sampler, rank, num_replicas

    def __iter__(self):
        order = list(islice(self.sampler, len(self.sampler)))
        return iter(order[self.rank::self.num_replicas][:len(self)])

    def __len__(self) -> int:
        return len(self.sampler) // self.num_replicas


def shard_train_data(datamodule: L.LightningDataModule, trainer: L.Trainer) -> None:
    """Make `datamodule`'s training loader yield this rank's share (a RankShard) once the
    trainer knows its data-parallel rank (DDP: every rank; FSDP / TP: the data-parallel
    dimension of the mesh, since the ranks of one tensor-parallel group read the same batch).
    One process: the loader as it was."""
    build = datamodule.train_dataloader

    @functools.wraps(build)
    def train_dataloader():
        loader = build()
        shard = trainer.distributed_sampler_kwargs  # None outside a parallel strategy
        if shard is None or shard["num_replicas"] == 1:
            return loader
        if not isinstance(loader, ResumableLoader):
            raise TypeError(f"multi-process training shards armodal's ResumableLoader "
                            f"(armodal.data.datamodule.make_train_loader); "
                            f"{type(datamodule).__name__} returned a {type(loader).__name__}")
        # The loader's _SkippingSampler skips what a restored checkpoint already trained on;
        # the shard goes under it, so the skip counts this rank's batches.
        loader.sampler.inner = RankShard(loader.sampler.inner, shard["rank"],
                                         shard["num_replicas"])
        if len(loader) == 0:
            raise ValueError(f"{len(loader.sampler.inner.sampler)} training items split over "
                             f"{shard['num_replicas']} ranks leave fewer than one batch of "
                             f"{loader.batch_size} per rank; lower domain.data.batch_size")
        return loader

    datamodule.train_dataloader = train_dataloader


def check_launch(trainer: L.Trainer) -> None:
    """Refuse a multi-process trainer in a process that nothing launched as one of its ranks.

    Lightning would then start the other ranks itself by re-running the command line, which
    `armodal train` has already handed to Hydra and rewritten; torchrun and srun start every
    rank themselves."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size > 1 and not environment.creates_processes_externally:
        raise ValueError(
            f"this trainer runs {trainer.world_size} processes (trainer.devices="
            f"{trainer.num_devices}, trainer.num_nodes={trainer.num_nodes}); start them with "
            f"torchrun --nproc_per_node {trainer.num_devices} -m armodal.cli train ... "
            f"(or srun on SLURM), not as a single `armodal train`")


def launcher_rank() -> int:
    """This process's global rank as its launcher set it (torchrun: RANK, srun: SLURM_PROCID,
    Lightning's own launcher: LOCAL_RANK), 0 when nothing did; known before any trainer is."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def shards_model(trainer: L.Trainer) -> bool:
    """True when the strategy splits the weights over ranks (FSDP, tensor parallelism), so that
    a forward pass needs every rank: nothing may run the model on rank 0 alone."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy))


class SameRunDir(L.Callback):
    """Stops a multi-process run, on every rank, when its ranks resolved different run dirs.

    Each process composes its own config, and a run dir stamped with the time (Hydra's
    default) differs between processes that start in different seconds: rank 0 would write the
    run while another rank resumed from, or wrote, elsewhere."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = str(run_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1 or not dist.is_initialized():
            return
        dirs: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(dirs, self.run_dir)
        if len(set(dirs)) > 1:
            seen = ", ".join(sorted(set(dirs)))
            raise ValueError(f"the ranks of this run resolved different run dirs ({seen}): "
                               f"pass run_dir=<dir> (e.g. run_dir=runs/<name>/$SLURM_JOB_ID) so "
                               f"that every process writes and resumes the same run")


class ModelParallel(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2 and / or tensor parallelism over a 2-D mesh,
    applied in ARModule.configure_model by armodal.parallel.parallelize), with two changes:

    - data_parallel_size="auto" fills the world: world size / tensor_parallel_size ranks, so
      tensor_parallel_size=1 is FSDP over every rank (Lightning's "auto" is the node count);
    - a checkpoint file (save_distributed_checkpoint=False: whole tensors, gathered on rank 0)
      loads its optimizer state as torch's Optimizer.load_state_dict does, matching parameters
      by their place in the parameter groups, whatever ids they carry: a DDP or one-process
      checkpoint resumes here (and this one's in them). Lightning maps the ids to parameters in
      module order instead, which is another order as soon as an optimizer has two groups, as
      ARModule's does (decay, no decay): the moments would land on the wrong parameters.
    """

    def setup_environment(self) -> None:
        tp = self._tensor_parallel_size
        if self._data_parallel_size == "auto" and tp != "auto":
            world = self.num_nodes * self.num_processes
            if world % tp:
                raise ValueError(f"tensor_parallel_size={tp} does not divide the {world} ranks "
                                 f"(trainer.devices x trainer.num_nodes)")
            self._data_parallel_size = world // tp
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():  # a sharded (distributed) checkpoint: Lightning's own loading
            return super().load_checkpoint(path, weights_only=weights_only)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
        options = StateDictOptions(full_state_dict=True,
                                   strict=self.lightning_module.strict_loading)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        names = {p: name for name, p in self.model.named_parameters()}
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            saved = [i for group in state["param_groups"] for i in group["params"]]
            current = [names[p] for group in optimizer.param_groups for p in group["params"]]
            if [len(g["params"]) for g in state["param_groups"]] != \
                    [len(g["params"]) for g in optimizer.param_groups]:
                raise ValueError(f"{path}: its optimizer's parameter groups do not match this "
                                 f"model's (a checkpoint of another model size?)")
            name_of = dict(zip(saved, current))
            by_name = {"state": {name_of[i]: s for i, s in state["state"].items()},
                       "param_groups": [{**group, "params": [name_of[i] for i in group["params"]]}
                                        for group in state["param_groups"]]}
            set_optimizer_state_dict(self.model, optimizer, by_name, options=options)
        return checkpoint
