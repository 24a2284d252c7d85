"""train(cfg): from a composed Hydra config to an exported run directory, top to bottom."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from armodal.callbacks import PlayEpisodes, SampleAudio, SampleImages, SampleSegments, SampleText
from armodal.checkpoint import atomic_write_text, load_run, save_run
from armodal.config_checks import check_train_config
from armodal.data import TokenDataModule
from armodal.data.action_module import ActionDataModule
from armodal.data.audio_module import AudioDataModule
from armodal.data.image_module import ImageDataModule
from armodal.data.multimodal_module import MultimodalDataModule
from armodal.data.video_module import VideoDataModule
from armodal.distributed import (
    SameRunDir,
    check_launch,
    launcher_rank,
    shard_train_data,
    shards_model,
)
from armodal.lit import ARModule
from armodal.loggers import finish_runs
from armodal.modality_metrics import ModalityGroups
from armodal.parallel import gather_model
from armodal.resume import AtomicCheckpointIO, fit_resumable


@dataclass
class TrainResult:
    run_dir: Path
    best_val_loss: float
    final_val_loss: float
    metrics: dict[str, float]
    steps: int
    seconds: float
    module: ARModule  # the trained model stays reachable for callers (tests, benchmarks)
    trainer: L.Trainer
    datamodule: TokenDataModule


def resolve_run_dir(cfg: DictConfig) -> Path:
    """cfg.run_dir, else Hydra's output dir, else runs/<name>/<timestamp>; fixed in cfg once."""
    if cfg.run_dir is None:
        if HydraConfig.initialized():
            run_dir = HydraConfig.get().runtime.output_dir
        else:
            run_dir = f"runs/{cfg.name}/{datetime.now():%Y%m%d-%H%M%S}"
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return Path(cfg.run_dir)


def start_run(cfg: DictConfig) -> Path:
    """Fix and create the run dir, write the resolved config into it, seed everything."""
    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if launcher_rank() == 0:  # one writer: under torchrun / srun, rank 0 of the launch
        atomic_write_text(run_dir / "train_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return run_dir


def train(cfg: DictConfig) -> TrainResult:
    """Tokenize (cached), build the model at the TokenSpace's vocab size, fit, export.

    A config with `task: codec` trains a neural image tokenizer instead (armodal.codecs.train),
    `task: audio_codec` a neural audio codec (armodal.codecs.audio_train), `task:
    sequence_tuning` fine-tunes a text run with REINFORCE (armodal.reinforce), `task:
    episode_tuning` an action run on its episode return (armodal.control.tuning), `task:
    prefix_captioning` a captioner reading images as prefix embeddings (armodal.prefix_train)."""
    check_train_config(cfg)  # a bad value fails now, naming its key, not after the data work
    if cfg.get("task") == "codec":
        from armodal.codecs.train import train_codec

        return train_codec(cfg)
    if cfg.get("task") == "sequence_tuning":
        from armodal.reinforce import train_sequence_level

        return train_sequence_level(cfg)
    if cfg.get("task") == "episode_tuning":
        from armodal.control.tuning import train_episode_level

        return train_episode_level(cfg)
    if cfg.get("task") == "prefix_captioning":
        from armodal.prefix_train import train_prefix_captioner

        return train_prefix_captioner(cfg)
    if cfg.get("task") == "audio_codec":
        from armodal.codecs.audio_train import train_audio_codec

        return train_audio_codec(cfg)
    start = time.perf_counter()
    run_dir = start_run(cfg)

    # Data first: a trainable tokenizer is fitted here, and it fixes the vocabulary size.
    tokenizer = instantiate(cfg.domain.tokenizer)
    datamodule = build_datamodule(cfg, tokenizer)
    datamodule.prepare_shards()
    space = datamodule.space

    model_config = instantiate(cfg.model, vocab_size=space.vocab_size,
                               max_seq_len=datamodule.seq_len, n_streams=datamodule.n_streams)
    units_per_token, unit, unit_ids = datamodule.units()
    module = ARModule(model_config, optimizer=instantiate(cfg.optim.optimizer),
                      scheduler=instantiate(cfg.optim.scheduler), pad_id=space.pad_id,
                      units_per_token=units_per_token, unit=unit, unit_ids=unit_ids,
                      compile=cfg.compile, nonfinite=cfg.nonfinite,
                      scheduled_sampling=cfg.get("scheduled_sampling"),
                      content_ids=unit_ids or (len(space.special_ids), space.vocab_size),
                      groups=modality_groups(datamodule))
    if cfg.get("init_from") is not None:
        load_weights_from(cfg.init_from, module.model, space, tokenizer)

    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [SameRunDir(run_dir)]
    decoding = instantiate(cfg.decoding)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    # Several processes (trainer=ddp, fsdp, tp, ...): armodal shards the training batches
    # itself (armodal/distributed.py); Lightning's sampler injection would break exact resume.
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                     default_root_dir=str(run_dir), use_distributed_sampler=False,
                                     plugins=[AtomicCheckpointIO()])
    check_launch(trainer)
    shard_train_data(datamodule, trainer)
    # Samples are drawn on rank 0 alone, which a model split over the ranks cannot do.
    if cfg.sample_every_validation and not shards_model(trainer):
        trainer.callbacks.append(sample_callback(cfg, datamodule, decoding, run_dir))
    fit_resumable(trainer, module, run_dir, cfg.resume, datamodule=datamodule)
    if not module.val_history or module.val_history[-1][0] != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final figure
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    final_val = module.val_history[-1][1]
    best_val = min(loss for _, loss in module.val_history)

    # The whole model, by rank 0 alone (FSDP / TP: gathered from every rank's shards first).
    whole = gather_model(module.model)
    if trainer.is_global_zero:
        save_run(run_dir, whole, space, tokenizer, extra={
            "domain": cfg.domain.name,
            "prompt": cfg.domain.get("prompt"),
            "decoding": OmegaConf.to_container(cfg.decoding, resolve=True),
            "metrics": {"best_val_loss": best_val, **metrics},
            "steps": trainer.global_step,
            "train_config": OmegaConf.to_container(cfg, resolve=True),
            **datamodule.run_meta(),
        })
    trainer.strategy.barrier("export")  # no rank returns before the run dir is complete
    finish_runs(loggers)
    result = TrainResult(run_dir, best_val, final_val, metrics, trainer.global_step,
                         time.perf_counter() - start, module, trainer, datamodule)
    if trainer.is_global_zero:
        print(summary(result, unit))
    return result


def modality_groups(datamodule) -> ModalityGroups | None:
    """Per-modality loss weights and metrics, for mixed-modality data only."""
    if not isinstance(datamodule, MultimodalDataModule):
        return None
    return ModalityGroups.from_space(datamodule.space, datamodule.loss_weights,
                                     datamodule.modality_units())


def load_weights_from(run_dir: str, model, space, tokenizer) -> None:
    """Start `model` from a finished run's weights. Its token ids must mean what this run's
    do, and its layers must have the same shapes; max_seq_len, RoPE scaling, dropout and the
    sliding window may differ (the RoPE tables are rebuilt, not loaded)."""
    start = load_run(run_dir)
    if start.space.to_dict() != space.to_dict() or \
            start.tokenizer.config() != tokenizer.config():
        raise ValueError(f"init_from={run_dir!r} has another tokenizer or token space than this "
                         f"run; fine-tuning needs the same token ids (train on the same domain "
                         f"and tokenizer settings)")
    try:
        model.load_state_dict(start.model.state_dict())
    except RuntimeError as err:
        shapes = "; ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ValueError(f"init_from={run_dir!r}: its layers do not match this model's "
                         f"(choose the same model size): {shapes}") from None


def build_datamodule(cfg: DictConfig, tokenizer) -> TokenDataModule | ImageDataModule \
        | AudioDataModule | ActionDataModule:
    """Text domains name a document `source`, image domains an image source `images`, audio
    domains an audio source `audio`, action domains an episode source `episodes`, video
    domains a clip source `video`, mixed-modality domains a `mixture` of segment sources."""
    domain = cfg.domain
    if "mixture" in domain:
        # "object": the parts stay the dataclass instances they are, not structured configs.
        return MultimodalDataModule(mixture=instantiate(domain.mixture, _convert_="object"),
                                    tokenizer=tokenizer,
                                    seed=cfg.seed, **domain.data)
    if "episodes" in domain:
        return ActionDataModule(episodes=instantiate(domain.episodes), tokenizer=tokenizer,
                                seed=cfg.seed, **domain.data)
    if "audio" in domain:
        return AudioDataModule(audio=instantiate(domain.audio), tokenizer=tokenizer,
                               seed=cfg.seed, **domain.data)
    if "video" in domain:
        return VideoDataModule(video=instantiate(domain.video), tokenizer=tokenizer,
                               seed=cfg.seed, **domain.data)
    if "images" in domain:
        return ImageDataModule(images=instantiate(domain.images), tokenizer=tokenizer,
                               seed=cfg.seed, **domain.data)
    return TokenDataModule(source=instantiate(domain.source), tokenizer=tokenizer,
                           seed=cfg.seed, **domain.data)


def sample_callback(cfg: DictConfig, datamodule, decoding, run_dir: Path) -> L.Callback:
    """Samples after each validation: an image grid PNG, a video strip PNG, WAV + spectrogram
    PNG files, text appended to samples.txt, or closed-loop episodes whose mean return is
    logged."""
    if isinstance(datamodule, MultimodalDataModule):
        return SampleSegments(datamodule.tokenizer, datamodule.val_samples, decoding,
                              path=str(run_dir / "samples"))
    if isinstance(datamodule, ActionDataModule):
        info = datamodule.run_meta()["action"]
        target = info["target_return"] if datamodule.tokenizer.has_returns else None
        return PlayEpisodes(datamodule.tokenizer, info["env_id"], datamodule.context, target)
    if isinstance(datamodule, AudioDataModule):
        return SampleAudio(datamodule.tokenizer, datamodule.layout, decoding,
                           path=str(run_dir / "samples"))
    if isinstance(datamodule, VideoDataModule):
        from armodal.videogen import SampleVideo

        return SampleVideo(datamodule.tokenizer, datamodule.layout,
                           datamodule.val_clips.frames[:4], decoding,
                           path=str(run_dir / "samples"))
    if isinstance(datamodule, ImageDataModule):
        return SampleImages(datamodule.tokenizer, datamodule.layout, decoding,
                            path=str(run_dir / "samples"))
    return SampleText(datamodule.tokenizer, datamodule.space, cfg.domain.prompt, decoding,
                      path=str(run_dir / "samples.txt"))


def summary(result: TrainResult, unit: str) -> str:
    """The end-of-run block: where the run is, how good it got, how to use it."""
    bits = result.metrics.get(f"val/bits_per_{unit}", math.nan)
    use = [f"  generate       armodal generate run={result.run_dir}"
           + (' prompt="..."' if unit == "byte" else "")]
    if unit == "action":  # an action run acts in its environment instead of generating
        use = [f"  val return     {result.metrics.get('val/return', math.nan):.1f} "
               f"(closed loop, a few episodes)"]
    return "\n".join([
        "",
        "=" * 72,
        f"run finished in {result.seconds:.0f} s, {result.steps} steps",
        f"  run dir        {result.run_dir}",
        f"  val loss       {result.final_val_loss:.4f} nats/token (best {result.best_val_loss:.4f})",
        f"  val bits/{unit:<5} {bits:.4f}",
        f"  loss curve     {result.run_dir / 'loss_curve.png'}",
        *use,
        f"  evaluate       armodal eval run={result.run_dir}",
        "=" * 72,
    ])
