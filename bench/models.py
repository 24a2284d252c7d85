"""The benchmark's models: Llama-shaped targets and ~10x smaller drafts, briefly trained.

Random weights make speculative decoding meaningless (a random draft agrees with a random
target only by chance) and greedy parity trivial, so each target and its draft are trained on
the same stdlib corpus, the same windows in the same order, for a fixed number of steps or until
a time budget runs out, whichever is first. Trained models are cached as Hugging Face Llama
checkpoint directories (armodal.hf.save_llama), which is also how the transformers side loads the
very same weights. A cached model is reused while its shape and schedule settings are unchanged;
delete its directory to retrain it.

Training uses bf16 autocast where the CPU's bf16 matmul beats fp32 (the machine line shows
both) and fp32 elsewhere. On 2 cores it is the slow part of a first run: ~10 minutes for the 20m
target, up to the 30-minute budget for the 120m target (~15 s a step), a few minutes for drafts.

Shapes (vocab 8192 BPE; untied target embeddings, tied draft embeddings as small Llamas do):
    20m   target 8 x 384, 6 heads / 2 kv, SwiGLU 1152      ~20.1M   draft 2 x 192    ~2.4M
    120m  target 12 x 768, 12 heads / 4 kv, SwiGLU 3072    ~116M    draft 4 x 384    ~9.4M
    quick target 2 x 64 over a 512-token BPE of 300 KB, for the smoke test
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from corpus import Corpus, held_out_nll, load_corpus

from armodal.hf import load_llama, save_llama
from armodal.model import ModelConfig, Transformer


@dataclass(frozen=True)
class Schedule:
    """How a model is briefly trained: AdamW, linear warmup, cosine to 10% of lr."""

    steps: int
    batch: int
    seq_len: int
    lr: float
    warmup: int = 20


@dataclass(frozen=True)
class Size:
    """One benchmark size: corpus settings, target and draft shapes, the training schedule."""

    name: str
    vocab_size: int
    corpus_bytes: int | None
    target: dict
    draft: dict
    target_schedule: Schedule
    draft_schedule: Schedule
    max_seq_len: int = 256
    budget_s: float = 600.0  # seconds per model; training stops early when it runs out


SIZES = {
    "quick": Size("quick", 512, 300_000,
                  dict(n_layer=2, n_head=2, n_kv_head=1, d_model=64, d_ff=192),
                  dict(n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=96,
                       tie_embeddings=True),
                  Schedule(30, 8, 64, 3e-3, 5), Schedule(30, 8, 64, 3e-3, 5),
                  max_seq_len=128, budget_s=8.0),
    "20m": Size("20m", 8192, None,
                dict(n_layer=8, n_head=6, n_kv_head=2, d_model=384, d_ff=1152),
                dict(n_layer=2, n_head=3, n_kv_head=1, d_model=192, d_ff=512,
                     tie_embeddings=True),
                Schedule(300, 8, 256, 1.5e-3), Schedule(300, 8, 256, 3e-3),
                budget_s=900.0),
    "120m": Size("120m", 8192, None,
                 dict(n_layer=12, n_head=12, n_kv_head=4, d_model=768, d_ff=3072),
                 dict(n_layer=4, n_head=6, n_kv_head=2, d_model=384, d_ff=1024,
                      tie_embeddings=True),
                 Schedule(100, 8, 256, 8e-4, 10), Schedule(100, 8, 256, 2e-3, 10),
                 budget_s=1800.0),
}


@dataclass
class Prepared:
    """A size's trained target and draft (fp32, eval mode), where they live, how they trained."""

    size: Size
    corpus: Corpus
    target: Transformer
    draft: Transformer
    target_dir: Path
    draft_dir: Path
    reports: dict[str, dict]  # "target" / "draft" -> steps, seconds, train_loss, val_loss


def prepare(size: Size, models_dir: Path, autocast_bf16: bool, budget_s: float | None = None,
            device: str = "cpu", log=print) -> Prepared:
    """Load the size's cached models, training (and caching) whichever is missing."""
    corpus = load_corpus(models_dir / f"corpus-v{size.vocab_size}-b{size.corpus_bytes}",
                         size.vocab_size, size.corpus_bytes)
    budget = size.budget_s if budget_s is None else budget_s
    models, dirs, reports = {}, {}, {}
    for role, shape, schedule in (("target", size.target, size.target_schedule),
                                  ("draft", size.draft, size.draft_schedule)):
        config = ModelConfig(vocab_size=corpus.vocab_size, max_seq_len=size.max_seq_len,
                             norm_eps=1e-6, **shape)
        dirs[role] = models_dir / f"{size.name}-{role}-{_key(config, schedule)}"
        models[role], reports[role] = _load_or_train(config, schedule, corpus, dirs[role],
                                                     autocast_bf16, budget, device, log)
        log(f"model {size.name} {role}: {models[role].num_params():,} params, "
            f"{_describe(reports[role])}, cached at {dirs[role]}")
    return Prepared(size, corpus, models["target"], models["draft"], dirs["target"],
                    dirs["draft"], reports)


def _key(config: ModelConfig, schedule: Schedule) -> str:
    """Short hash of everything that decides the trained weights (not the time budget)."""
    blob = json.dumps([config.to_dict(), asdict(schedule)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _describe(report: dict) -> str:
    return (f"trained {report['steps']} steps x {report['tokens_per_step']} tokens in "
            f"{report['seconds']:.0f} s ({report['precision']}), train loss "
            f"{report['train_loss']:.3f}, val loss {report['val_loss']:.3f}")


def _load_or_train(config: ModelConfig, schedule: Schedule, corpus: Corpus, directory: Path,
                   autocast_bf16: bool, budget_s: float, device: str, log):
    report_path = directory / "train.json"
    if report_path.is_file():
        return load_llama(directory, dtype=torch.float32), json.loads(report_path.read_text())
    log(f"training {directory.name} (budget {budget_s:.0f} s) ...")
    torch.manual_seed(0)
    model = Transformer(config)
    report = train(model, corpus, schedule, autocast_bf16, budget_s, device)
    model = model.cpu().float().eval()
    report["val_loss"] = held_out_nll(model, corpus, schedule.seq_len, batches=4)
    save_llama(model, directory)
    report_path.write_text(json.dumps(report, indent=2) + "\n")  # written last: marks done
    return model, report


def train(model: Transformer, corpus: Corpus, schedule: Schedule, autocast_bf16: bool,
          budget_s: float, device: str) -> dict:
    """A plain AdamW loop on random training windows: schedule.steps, or as many as fit the
    budget (judged after 3 and again after 10 steps; the cosine spans the steps that fit)."""
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}],
                                  lr=schedule.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    total, losses, start = schedule.steps, [], time.perf_counter()
    step = 0
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr * _lr_factor(step, total, schedule.warmup)
        batch = corpus.windows("train", schedule.batch, schedule.seq_len + 1, rng).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=autocast_bf16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step == 1:
            first = time.perf_counter() - start  # includes one-time allocation and warm-up
        if step in (3, 10):  # fit the schedule into the budget, judged from steps 2 on
            per_step = (time.perf_counter() - start - first) / (step - 1)
            total = max(min(schedule.steps, int((budget_s - first) / per_step) + 1), step)
        if time.perf_counter() - start > 1.25 * budget_s:  # the machine got slower: stop
            break
    return {"steps": step, "tokens_per_step": schedule.batch * schedule.seq_len,
            "seconds": time.perf_counter() - start,
            "precision": "bf16 autocast" if autocast_bf16 else "fp32",
            "train_loss": float(np.mean(losses[-10:])), "requested_steps": schedule.steps}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    warmup = min(warmup, max(total // 5, 1))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def load_hf(directory: Path):
    """The same checkpoint as a transformers LlamaForCausalLM (fp32, eval mode)."""
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
