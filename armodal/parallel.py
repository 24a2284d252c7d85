"""Sharding armodal's Transformer over ranks: tensor parallelism (DTensor) and FSDP2.

Tensor parallelism (Megatron-style, one all-reduce per attention and per MLP in each
direction) splits every block's heads and MLP width over the `tp` ranks of a device mesh:

    attn.wq / wk / wv, mlp.w_gate / w_up    column-wise: each rank computes its own heads and
                                            its slice of the hidden width, no communication
    attn.wo, mlp.w_down                     row-wise: partial sums, all-reduced into the
                                            replicated residual stream
    embed                                   row-wise over the vocabulary (ids outside a rank's
                                            rows give zeros, the sum is all-reduced)
    head                                    column-wise over the vocabulary, logits gathered:
                                            the loss and the decoders see whole logits
    norms                                   replicated (whole weights on every rank, kept as
                                            DTensors so that gradient clipping sees one kind
                                            of tensor)

Attention runs on local heads unchanged: model.py's rearranges name the head width, not the
head count, and Transformer.tp_size makes a KV cache hold n_kv_head / tp heads. n_head,
n_kv_head and d_ff must divide by tp; tied embeddings are refused (the one matrix would be
split two ways).

FSDP2 (`fully_shard`) shards every block, then the root, over the data-parallel mesh
dimension. Lightning's ModelParallelStrategy hands ARModule.configure_model a 2-D mesh
("data_parallel", "tensor_parallel"); `parallelize` applies whichever of the two has size > 1.

The same code runs on CPU over gloo and on GPUs over NCCL; tests/test_distributed.py checks
it on CPU (TP on 2 ranks, FSDP2 on 2, both on 4) against one process. GPUs: unverified here.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from armodal.model import ModelConfig, Transformer

if TYPE_CHECKING:
    from armodal.checkpoint import LoadedRun
    from armodal.generation import DecodingConfig

__all__ = ["ReplicateParallel", "apply_fsdp", "apply_tensor_parallel", "check_tensor_parallel",
           "gather_model", "is_sharded", "parallelize", "tensor_parallel_generation",
           "tensor_parallel_plan"]


class ReplicateParallel(ParallelStyle):
    """A module kept whole on every rank, its parameters replicated DTensors: it takes and
    returns plain (replicated) tensors. For the RMSNorms between the sharded layers, so that
    every parameter is a DTensor (torch's gradient-norm clipping refuses a mix)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicated(_module, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                         if isinstance(x, torch.Tensor) else x for x in inputs)

        def local(_module, output, _mesh):
            return output.to_local()

        return distribute_module(module, device_mesh, input_fn=replicated, output_fn=local)


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise ValueError unless `config`'s heads and MLP width split evenly over `tp` ranks."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor-parallel size {tp!r}: expected an integer >= 1")
    sizes = {"n_head": config.n_head, "n_kv_head": config.n_kv_head, "d_ff": config.d_ff}
    uneven = [f"{name}={size}" for name, size in sizes.items() if size % tp]
    if uneven:
        allowed = [d for d in range(1, config.n_head + 1)
                   if all(size % d == 0 for size in sizes.values())]
        raise ValueError(f"tensor parallelism over {tp} ranks splits attention heads and the MLP "
                         f"width evenly, but {', '.join(uneven)} "
                         f"{'is' if len(uneven) == 1 else 'are'} not divisible by {tp}; "
                         f"this model allows tensor-parallel sizes {allowed}")
    if config.tie_embeddings and tp > 1:
        raise ValueError("tensor parallelism does not support tie_embeddings=true (the shared "
                         "embedding / output matrix would be split two ways); train with "
                         "model.tie_embeddings=false, or use DDP / FSDP")


def tensor_parallel_plan() -> dict[str, ParallelStyle]:
    """The plan for torch's parallelize_module over a Transformer: module name -> style."""
    block = {
        "attn_norm": ReplicateParallel(),
        "attn.wq": ColwiseParallel(),
        "attn.wk": ColwiseParallel(),
        "attn.wv": ColwiseParallel(),
        "attn.wo": RowwiseParallel(),
        "mlp_norm": ReplicateParallel(),
        "mlp.w_gate": ColwiseParallel(),
        "mlp.w_up": ColwiseParallel(),
        "mlp.w_down": RowwiseParallel(),
    }
    return {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        **{f"blocks.*.{name}": style for name, style in block.items()},
        "norm": ReplicateParallel(),
        "head": ColwiseParallel(output_layouts=Replicate()),
    }


def is_sharded(model: nn.Module) -> bool:
    """True once tensor parallelism or FSDP2 has turned the parameters into DTensors."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def apply_tensor_parallel(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Shard `model` in place over the 1-D `mesh` with tensor_parallel_plan()."""
    tp = mesh.size()
    check_tensor_parallel(model.config, tp)
    parallelize_module(model, mesh, tensor_parallel_plan())
    model.tp_size = tp
    return model


def apply_fsdp(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """FSDP2 in place over the 1-D `mesh`: each block is one all-gather unit, the root (embedding,
    final norm, head) another."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def parallelize(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Shard `model` over Lightning's 2-D mesh ("data_parallel", "tensor_parallel"): tensor
    parallelism when that dimension has more than one rank, then FSDP2 over the data-parallel
    one when it has. Idempotent: Lightning calls configure_model before fit and again before
    validate."""
    if is_sharded(model):
        return model
    if mesh["tensor_parallel"].size() > 1:
        apply_tensor_parallel(model, mesh["tensor_parallel"])
    if mesh["data_parallel"].size() > 1:
        apply_fsdp(model, mesh["data_parallel"])
    return model


def gather_model(model: Transformer) -> Transformer | None:
    """The whole model: `model` itself when it is not sharded; else (a collective: every rank
    calls it) a plain Transformer with the full weights on rank 0, and None on the others."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Full tensors, on CPU, on rank 0 only: what model.safetensors holds, and no more memory.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    whole = Transformer(model.config)
    whole.load_state_dict(state)
    return whole


def tensor_parallel_generation(run: LoadedRun, tp: int, decoding: DecodingConfig,
                               draft_run: str | None = None, quantize: str | None = None
                               ) -> None:
    """Make this process one of `tp` tensor-parallel ranks decoding `run` together (launched
    by `torchrun --nproc_per_node <tp>`, which sets RANK / WORLD_SIZE): joins the process
    group, shards run.model in place, and sends the standard output of ranks other than 0 to
    /dev/null, since every rank runs the same decoding loop and would print the same text.

    Every rank computes the same whole logits, so greedy decoding picks the same tokens on
    all of them, and so does sampling (same seed; unseeded runs start from torch's fixed
    default seed on every rank). Text runs only; no draft model, quantization or compiled
    decoding."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise ValueError(f"parallel.tp={tp} needs {tp} processes, one per rank; this one runs "
                         f"with WORLD_SIZE={world}: launch with "
                         f"torchrun --nproc_per_node {tp} -m armodal.cli generate ...")
    unsupported = [(run.tokenizer.modality != "text", f"a {run.tokenizer.modality} run"),
                   (draft_run is not None, "draft_run (speculative decoding)"),
                   (quantize is not None or getattr(run.model, "quantization", None) is not None,
                    "a quantized model"),
                   (decoding.compile, "decoding.compile=true")]
    named = [what for bad, what in unsupported if bad]
    if named:
        raise ValueError(f"parallel.tp={tp} decodes full-precision text runs eagerly; not "
                         f"supported: {', '.join(named)}")
    check_tensor_parallel(run.model.config, tp)
    device = next(run.model.parameters()).device
    if device.type == "cuda":  # one GPU per rank: device=cuda means this rank's own
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        run.model.to(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    apply_tensor_parallel(run.model, init_device_mesh(device.type, (tp,)))
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- lives as long as the process
