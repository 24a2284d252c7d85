"""A NaN / inf loss or gradient mid-run: skipped (no update, counted) or the run stops."""

import lightning as L
import pytest
import torch

from armodal.lit import ARModule
from armodal.model import ModelConfig

BAD_STEP = 2


class Snapshots(L.Callback):
    """The weights after every training batch."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().flatten().clone()
                                       for p in pl_module.model.parameters()]))


def fit(fault: str, nonfinite: str, steps: int = 5):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, d_model=16,
                         max_seq_len=8)
    module = ARModule(config, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
                      nonfinite=nonfinite)
    loss = module.loss

    def faulty_loss(batch):  # NaN loss, or an inf gradient, at one step only
        value, count = loss(batch)
        if module.global_step == BAD_STEP:
            if fault == "loss":
                value = value * float("nan")
            else:  # the loss stays finite; its gradient does not
                value.register_hook(lambda grad: grad * float("inf"))
        return value, count

    module.loss = faulty_loss
    snaps = Snapshots()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[snaps], gradient_clip_val=1.0)
    data = torch.randint(0, 16, (steps * 4, 9), generator=torch.Generator().manual_seed(1))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return module, snaps.weights


@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_nonfinite_step_is_skipped_and_counted(fault):
    module, weights = fit(fault, "skip")
    assert module.skipped_steps == 1
    assert torch.equal(weights[BAD_STEP], weights[BAD_STEP - 1])  # no update at the bad step
    assert not torch.equal(weights[BAD_STEP + 1], weights[BAD_STEP])  # training goes on
    assert all(torch.isfinite(w).all() for w in weights)


def test_nonfinite_stop_ends_the_run_with_a_message():
    with pytest.raises(FloatingPointError, match=f"non-finite loss nan at step {BAD_STEP}"):
        fit("loss", "stop")
    with pytest.raises(ValueError, match="nonfinite='ignore'; allowed: skip, stop"):
        ARModule(ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_kv_head=1, d_model=8,
                             max_seq_len=4), optimizer=torch.optim.AdamW, nonfinite="ignore")
