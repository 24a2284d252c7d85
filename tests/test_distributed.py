"""Multi-process training and tensor-parallel decoding on CPU: 2 ranks over gloo.

Ranks are processes forked from one forkserver that has imported armodal once, with the
environment torchrun would give them (RANK, WORLD_SIZE, ...), so a launch costs seconds, not
an import per rank. The `slow` tests run the real `torchrun ... -m armodal.cli` commands.

The backbone is equivalence with one process at the same global batch (byte tokenizer, tiny
model, dropout 0, constant learning rate so that a 4-step run is the first half of an 8-step
one): per-step train losses, val loss and exported weights, and runs resumed across strategies.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from armodal.cli import CONF_DIR, RECIPES_DIR, compose_config
from armodal.config_checks import check_train_config

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8  # the global batch: 8 in one process, 4 per rank under DDP / FSDP, 8 under TP
TOL = dict(rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# launching ranks


def _rank_main(target, rank: int, world: int, port: int, log: str, args: tuple) -> None:
    """One rank: torchrun's environment, one thread, output to its own log file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      GROUP_RANK="0", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    torch.set_num_threads(1)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        target(*args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(target, *args, world: int = 2, logs: Path, timeout: float = 240) -> None:
    """Run target(*args) in `world` ranks; fail with the ranks' logs if one fails."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["armodal.train", "armodal.parallel", "armodal.generation"])
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    paths = [logs / f"rank{rank}.log" for rank in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(target, rank, world, port, str(paths[rank]),
                                                  args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    if any(p.exitcode != 0 for p in procs):
        tails = "\n".join(f"--- rank {r} (exit {p.exitcode})\n{paths[r].read_text()[-3000:]}"
                          for r, p in enumerate(procs))
        pytest.fail(f"a rank failed:\n{tails}")


def overrides(corpus: Path, cache: Path, run_dir: Path, steps: int, *extra: str,
              trainer: str = "cpu") -> list[str]:
    """A tiny byte-level run; validation over the whole val split (exact under any strategy)."""
    return ["domain=text_byte", f"domain.source.path={corpus}", f"domain.data.cache_dir={cache}",
            "domain.data.seq_len=32", "domain.data.val_batches=null", "model=tiny",
            f"trainer={trainer}", f"trainer.max_steps={steps}", "trainer.val_check_interval=4",
            "trainer.limit_val_batches=1.0", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "optim.scheduler.warmup_steps=0", "optim.scheduler.min_lr_ratio=1.0",
            "sample_every_validation=false", "checkpoint_every=4", f"run_dir={run_dir}", *extra]


def train_with(args: list[str]):
    """train() on a config composed from conf/train.yaml (in a rank, or in this process)."""
    from armodal.train import train

    return train(compose_config(CONF_DIR, "train", args))


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]


def val_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "config.json").read_text())["metrics"]["val/loss"]


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = load_file(run_a / "model.safetensors"), load_file(run_b / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOL, msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus_file):
    """The one-process references at batch 8: 8 steps (the curve), 4 steps (its checkpoint)."""
    tmp = tmp_path_factory.mktemp("one_process")
    cache = tmp / "cache"
    for steps in (8, 4):
        train_with(overrides(corpus_file, cache, tmp / f"steps{steps}", steps,
                             f"domain.data.batch_size={BATCH}"))
    return tmp, cache


# ---------------------------------------------------------------------------------------------
# training


def test_ddp_equals_one_process_and_checkpoints_load_both_ways(one_process, corpus_file,
                                                               tmp_path):
    ref, cache = one_process
    curve = train_losses(ref / "steps8")
    per_rank = f"domain.data.batch_size={BATCH // 2}"

    # 2 ranks x 4 = the one-process batch of 8, in the same order: the same loss curve.
    ddp = tmp_path / "ddp"
    launch(train_with, overrides(corpus_file, cache, ddp, 4, per_rank, trainer="ddp"),
           logs=tmp_path / "logs1")
    torch.testing.assert_close(train_losses(ddp), curve[:4], **TOL)
    assert val_loss(ddp) == pytest.approx(val_loss(ref / "steps4"), abs=2e-5)
    assert_same_weights(ddp, ref / "steps4")  # model.safetensors: whole, loads in one process

    # The DDP run's last.ckpt resumes in one process: the rest of the one-process curve.
    train_with(overrides(corpus_file, cache, ddp, 8, f"domain.data.batch_size={BATCH}",
                         "resume=auto"))
    torch.testing.assert_close(train_losses(ddp), curve[4:], **TOL)
    assert_same_weights(ddp, ref / "steps8")

    # A one-process checkpoint resumes under DDP.
    resumed = tmp_path / "one_then_ddp"
    shutil.copytree(ref / "steps4", resumed)
    launch(train_with, overrides(corpus_file, cache, resumed, 8, per_rank, "resume=auto",
                                 trainer="ddp"), logs=tmp_path / "logs2")
    torch.testing.assert_close(train_losses(resumed), curve[4:], **TOL)
    assert_same_weights(resumed, ref / "steps8")


def test_fsdp2_equals_one_process_and_its_checkpoint_resumes_in_one(one_process, corpus_file,
                                                                     tmp_path):
    ref, cache = one_process
    curve = train_losses(ref / "steps8")
    fsdp = tmp_path / "fsdp"
    launch(train_with, overrides(corpus_file, cache, fsdp, 4,
                                 f"domain.data.batch_size={BATCH // 2}", trainer="fsdp"),
           logs=tmp_path / "logs")
    torch.testing.assert_close(train_losses(fsdp), curve[:4], **TOL)
    assert_same_weights(fsdp, ref / "steps4")  # gathered from the shards by rank 0
    ckpt = torch.load(fsdp / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(type(t).__name__ == "DTensor" for t in ckpt["state_dict"].values())

    # Weights and optimizer state (keyed as a plain optimizer keys them) resume in one process.
    train_with(overrides(corpus_file, cache, fsdp, 8, f"domain.data.batch_size={BATCH}",
                         "resume=auto"))
    torch.testing.assert_close(train_losses(fsdp), curve[4:], **TOL)
    assert_same_weights(fsdp, ref / "steps8")


def test_tensor_parallel_resumes_a_one_process_checkpoint_and_equals_it(one_process,
                                                                         corpus_file, tmp_path):
    ref, cache = one_process
    tp = tmp_path / "tp"
    shutil.copytree(ref / "steps4", tp)
    # Both ranks read the whole batch of 8; heads and MLP width are split between them.
    launch(train_with, overrides(corpus_file, cache, tp, 8, f"domain.data.batch_size={BATCH}",
                                 "resume=auto", trainer="tp"),
           logs=tmp_path / "logs")
    torch.testing.assert_close(train_losses(tp), train_losses(ref / "steps8")[4:], **TOL)
    assert val_loss(tp) == pytest.approx(val_loss(ref / "steps8"), abs=2e-5)
    assert_same_weights(tp, ref / "steps8")


def _train_in_own_dir(args: list[str], base: str) -> None:
    """A rank whose run dir differs from the others' (as per-process timestamps would)."""
    try:
        train_with([*args, f"run_dir={base}/rank{os.environ['RANK']}"])
    except ValueError as refusal:
        Path(f"{base}/refusal{os.environ['RANK']}").write_text(str(refusal))


def test_ranks_that_resolve_different_run_dirs_are_stopped(one_process, corpus_file, tmp_path):
    ref, cache = one_process
    args = overrides(corpus_file, cache, tmp_path / "unused", 4,
                     f"domain.data.batch_size={BATCH // 2}", trainer="ddp")
    launch(_train_in_own_dir, args, str(tmp_path), logs=tmp_path / "logs")
    for rank in range(2):  # both stop, before any step: neither waits for the other
        refusal = (tmp_path / f"refusal{rank}").read_text()
        assert "resolved different run dirs" in refusal and "pass run_dir=" in refusal
        assert not (tmp_path / f"rank{rank}" / "checkpoints").exists()


def test_a_rank_without_its_launcher_is_refused(one_process, corpus_file, tmp_path):
    ref, cache = one_process
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        train_with(overrides(corpus_file, cache, tmp_path / "run", 4, trainer="ddp"))


# ---------------------------------------------------------------------------------------------
# tensor-parallel decoding


def _decode(run_dir: str, tp: int, out: str) -> None:
    """Greedy, seeded sampling and beam search with the KV cache, and one forward's logits."""
    from armodal.checkpoint import load_run
    from armodal.generation import DecodingConfig, generate
    from armodal.parallel import tensor_parallel_generation

    run = load_run(run_dir)
    configs = {"greedy": DecodingConfig(strategy="greedy", max_new_tokens=20),
               "sample": DecodingConfig(strategy="sample", temperature=1.5, seed=7,
                                        max_new_tokens=20),
               "beam": DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=8)}
    if tp > 1:
        tensor_parallel_generation(run, tp, configs["greedy"])
        assert run.model.tp_size == tp
    bos = run.space.bos_id
    prompts = [[bos, *b"def f(x):"], [bos, *b"import "]]  # ragged: left-padded, per-row positions
    result = {name: generate(run.model, prompts, config) for name, config in configs.items()}
    with torch.no_grad():
        logits = run.model(torch.tensor([[bos, *b"class A:\n    pass"]]))
    if tp == 1 or torch.distributed.get_rank() == 0:
        torch.save({"tokens": {k: v.sequences for k, v in result.items()},
                    "logprobs": {k: v.logprobs for k, v in result.items()},
                    "logits": logits}, out)


def test_tensor_parallel_decoding_equals_one_rank(one_process, tmp_path):
    run_dir = str(one_process[0] / "steps8")
    _decode(run_dir, 1, str(tmp_path / "one.pt"))
    launch(_decode, run_dir, 2, str(tmp_path / "tp.pt"), logs=tmp_path / "logs")
    one, tp = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "tp.pt")
    assert tp["tokens"] == one["tokens"]
    assert len(one["tokens"]["sample"][0]) == 20
    for name in one["logprobs"]:
        for a, b in zip(tp["logprobs"][name], one["logprobs"][name]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
    torch.testing.assert_close(tp["logits"], one["logits"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# without processes: the plan's checks, the data shards, the configs


def test_tensor_parallel_sizes_must_divide_the_heads():
    from armodal.model import ModelConfig
    from armodal.parallel import check_tensor_parallel

    config = ModelConfig(vocab_size=300, n_head=12, n_kv_head=4, d_model=768)
    check_tensor_parallel(config, 4)
    with pytest.raises(ValueError, match=r"n_head=12, n_kv_head=4 are not.*sizes \[1, 2, 4\]"):
        check_tensor_parallel(config, 8)
    with pytest.raises(ValueError, match=r"n_head=12, n_kv_head=12 are not divisible by 8; "
                                         r"this model allows tensor-parallel sizes "
                                         r"\[1, 2, 3, 4, 6, 12\]"):
        check_tensor_parallel(ModelConfig(vocab_size=300, n_head=12, d_model=768, d_ff=3072), 8)
    with pytest.raises(ValueError, match="tie_embeddings"):
        check_tensor_parallel(ModelConfig(vocab_size=300, tie_embeddings=True), 2)


def test_a_local_kv_cache_holds_this_ranks_heads():
    from armodal.model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=50, n_head=4, n_kv_head=2, d_model=64))
    model.tp_size = 2
    cache = model.new_cache(3, 16)
    assert cache.k.shape == (4, 3, 1, 16, 16)  # (L, B, G / tp, S, D): D stays d_model / n_head


def test_rank_shards_make_up_the_one_process_batches_and_keep_the_generator():
    from torch.utils.data import RandomSampler

    from armodal.distributed import RankShard

    def sampler():
        return RandomSampler(range(103), replacement=True, num_samples=103,
                             generator=torch.Generator().manual_seed(5))

    one, shards = sampler(), [sampler(), sampler()]
    order = list(one)
    parts = [list(RankShard(s, rank, 2)) for rank, s in enumerate(shards)]
    assert [len(p) for p in parts] == [51, 51]
    b = 4  # per rank: step k of the two ranks = positions [8k, 8k + 8) of one process's order
    for k in range(51 // b):
        assert sorted(parts[0][k * b:(k + 1) * b] + parts[1][k * b:(k + 1) * b]) == \
            sorted(order[k * 2 * b:(k + 1) * 2 * b])
    for s in shards:  # each rank drew the whole epoch, like the single process
        assert torch.equal(s.generator.get_state(), one.generator.get_state())


@pytest.mark.parametrize("trainer", ["ddp", "fsdp", "tp", "ddp_gpu", "fsdp_gpu", "tp_gpu"])
def test_trainer_configs_compose_and_pass_the_checks(trainer):
    cfg = compose_config(RECIPES_DIR, "text_code_cpu", [f"trainer={trainer}"])
    check_train_config(cfg)
    assert cfg.trainer.strategy is not None
    if trainer.endswith("_gpu"):
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


def test_slurm_launcher_composes_from_the_trainer():
    from hydra.utils import get_class

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="the optional extra: pip install armodal[slurm]")

    with initialize_config_dir(str(RECIPES_DIR), version_base=None):
        cfg = compose("text_code_cpu", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "trainer=ddp_gpu", "trainer.devices=8",
            "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
            f"hydra.searchpath=[file://{CONF_DIR}]"])
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu"


# ---------------------------------------------------------------------------------------------
# the real launchers (slow: each rank imports everything)


def _torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([str(torchrun), "--nproc_per_node", str(nproc), "--master_port",
                             str(_free_port()), "-m", "armodal.cli", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_torchrun_cli_trains_ddp_and_decodes_tensor_parallel(one_process, corpus_file, tmp_path):
    ref, cache = one_process
    run = tmp_path / "ddp"
    args = overrides(corpus_file, cache, run, 4, f"domain.data.batch_size={BATCH // 2}",
                     trainer="ddp")
    _torchrun(2, "train", str(CONF_DIR / "train.yaml"), *args, cwd=ROOT)
    torch.testing.assert_close(train_losses(run), train_losses(ref / "steps4"), **TOL)
    prompt = ["prompt=def main():", "decoding=sample", "decoding.seed=3",
              "decoding.max_new_tokens=20"]
    one = subprocess.run([sys.executable, "-m", "armodal.cli", "generate", f"run={run}",
                          *prompt], capture_output=True, text=True, check=True)
    tp = _torchrun(2, "generate", f"run={run}", *prompt, "parallel.tp=2", cwd=ROOT)
    assert tp.stdout == one.stdout  # the same 20 tokens, printed once (by rank 0)
    assert one.stdout.startswith("def main():") and len(one.stdout) > len("def main():") + 10


@pytest.mark.slow
def test_fsdp_with_tensor_parallelism_on_four_ranks(one_process, corpus_file, tmp_path):
    ref, cache = one_process
    run = tmp_path / "fsdp_tp"  # 2 data-parallel groups x 2 tensor-parallel ranks
    launch(train_with, overrides(corpus_file, cache, run, 4, "trainer.devices=4",
                                 "trainer.strategy.data_parallel_size=2",
                                 "trainer.strategy.tensor_parallel_size=2",
                                 f"domain.data.batch_size={BATCH // 2}", trainer="tp"),
           world=4, logs=tmp_path / "logs")
    torch.testing.assert_close(train_losses(run), train_losses(ref / "steps4"), **TOL)
    assert_same_weights(run, ref / "steps4")
