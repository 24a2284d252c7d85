"""wandb that never blocks a run: offline unless an account is configured."""

from __future__ import annotations

import netrc
import os

from lightning.pytorch.loggers import WandbLogger


def wandb_configured() -> bool:
    """True when wandb has credentials: WANDB_API_KEY or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(project: str, save_dir: str, name: str | None = None, **kwargs) -> WandbLogger:
    """WandbLogger that respects WANDB_MODE, else goes online only with credentials."""
    os.makedirs(save_dir, exist_ok=True)
    if os.environ.get("WANDB_MODE"):  # wandb itself reads it: online, offline or disabled
        return WandbLogger(project=project, save_dir=save_dir, name=name, **kwargs)
    return WandbLogger(project=project, save_dir=save_dir, name=name,
                       offline=not wandb_configured(), **kwargs)


def finish_runs(loggers: list) -> None:
    """End the wandb runs of a finished training. Lightning's WandbLogger joins a run that is
    still open in the process, so without this a second train() in one process (tests,
    notebooks, in-process sweeps) would log into the first one's run."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
