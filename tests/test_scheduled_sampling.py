"""Scheduled sampling (issue 11): eps = 0 is teacher forcing bit for bit; replacements land
exactly on the eligible positions, never on pads, the first token or loss-masked structure; a
replacement never depends on the token it replaces or on later ones; the schedules' values."""

import math

import lightning as L
import pytest
import torch

from armodal.cli import RECIPES_DIR, compose_config
from armodal.config_checks import ConfigError, check_train_config
from armodal.lit import IGNORE_INDEX, ARModule, ScheduledSampling, shift_targets
from armodal.model import ModelConfig

VOCAB, PAD, CONTENT = 24, 0, (5, 20)  # ids 1..4: bos / eos / structure markers
SENTINEL = 17


def module(ss=None, n_streams=1, dropout=0.0, content_ids=CONTENT, seed=0) -> ARModule:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=2, d_model=16,
                         max_seq_len=16, n_streams=n_streams, dropout=dropout)
    return ARModule(config, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
                    pad_id=PAD, scheduled_sampling=ss, content_ids=content_ids)


def sentinel_forward(recorded: list):
    """A stand-in model that always predicts SENTINEL and records the inputs it is given."""
    def forward(idx):
        recorded.append(idx.clone())
        logits = torch.zeros(*idx.shape, VOCAB, requires_grad=True)
        return logits + 50.0 * torch.nn.functional.one_hot(torch.tensor(SENTINEL), VOCAB)
    return forward


def structured_batch() -> dict:
    """Content tokens mixed with pads, structure ids and loss-masked positions."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(*CONTENT, (4, 13), generator=g)
    tokens[tokens == SENTINEL] = SENTINEL + 1  # so a SENTINEL input can only be a replacement
    tokens[:, 0] = 1  # bos
    tokens[0, 0] = 9  # a content token first: never a target, so never replaced either
    tokens[1, 4] = tokens[2, 7] = 3  # structure markers (learned, but not content)
    tokens[3, 9:] = PAD
    loss_mask = torch.ones_like(tokens, dtype=torch.bool)
    loss_mask[2, 2:5] = False  # e.g. an action run's observation tokens
    return {"tokens": tokens, "loss_mask": loss_mask}


def eligible_inputs(batch: dict) -> torch.Tensor:
    """(B, T) bool, computed independently: input t may be replaced iff t >= 1 and the true
    token there is a learned content token."""
    tokens, mask = batch["tokens"][..., :-1], batch["loss_mask"][..., :-1]
    ok = mask & (tokens != PAD) & (tokens >= CONTENT[0]) & (tokens < CONTENT[1])
    ok[..., 0] = False
    return ok


def test_schedules_hand_computed():
    def eps(schedule, step, **kw):
        return ScheduledSampling(schedule, eps_start=0.1, eps_end=0.5, **kw).eps(step)

    assert eps(None, 500) == 0.0
    assert [eps("linear", s, steps=100) for s in (0, 25, 50, 100, 400)] == \
        pytest.approx([0.1, 0.2, 0.3, 0.5, 0.5])
    # p = exp(-step / steps): 1, e^-1 = 0.3678794, e^-2 = 0.1353353
    assert [eps("exponential", s, steps=100) for s in (0, 100, 200)] == \
        pytest.approx([0.1, 0.1 + 0.4 * 0.6321206, 0.1 + 0.4 * 0.8646647])
    # p = k / (k + exp(step / k)), k = 10: 10/11; 1/2 at 10 ln 10 = 23.02585; 10/22036.47
    assert [eps("inverse_sigmoid", s, k=10) for s in (0, 10 * math.log(10), 100)] == \
        pytest.approx([0.1 + 0.4 / 11, 0.3, 0.1 + 0.4 * (1 - 4.537942e-4)])
    assert eps("inverse_sigmoid", 10**9, k=1) == pytest.approx(0.5)  # no overflow


@pytest.mark.parametrize("key,value", [
    ("schedule", "cosine"), ("eps_start", -0.1), ("eps_end", 1.5), ("eps_end", float("nan")),
    ("steps", 0), ("steps", 2.5), ("k", 0.5), ("mode", "beam"), ("temperature", 0.0),
    ("temperature", -1.0)])
def test_bad_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"^scheduled_sampling.{key}="):
        module({"schedule": "linear", key: value})
    cfg = compose_config(RECIPES_DIR, "text_code_cpu", [f"scheduled_sampling.{key}={value}"])
    with pytest.raises(ConfigError) as refusal:
        check_train_config(cfg)
    message = str(refusal.value)
    assert message.startswith(f"scheduled_sampling.{key}=") and "expected" in message
    assert "\n" not in message


def test_defaults_are_off_and_pass_the_checks():
    cfg = compose_config(RECIPES_DIR, "text_code_cpu", [])
    check_train_config(cfg)
    assert cfg.scheduled_sampling.schedule is None
    assert module(cfg.scheduled_sampling).scheduled_sampling is None


def grads(m: ARModule, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    m.zero_grad()
    loss, _ = m.loss(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in m.parameters()]


def test_eps_zero_is_teacher_forcing_exactly():
    batch = structured_batch()
    plain = module()
    loss, plain_grads = grads(plain, batch)
    ss = module({"schedule": "linear", "eps_start": 0.0, "eps_end": 0.0})
    state = torch.get_rng_state()
    same, replaced = ss.scheduled_inputs(batch, ss.scheduled_sampling.eps(1000))
    assert same is batch and replaced == 0  # no first pass ...
    assert torch.equal(torch.get_rng_state(), state)  # ... and no random draw
    ss_loss, ss_grads = grads(ss, same)
    assert torch.equal(loss, ss_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ss_grads))
    # The mixed-input path with nothing replaced is the same computation too.
    mixed, replaced = ss.scheduled_inputs(batch, 1e-12)
    assert "inputs" in mixed and replaced == 0
    ss_loss, ss_grads = grads(ss, mixed)
    assert torch.equal(loss, ss_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ss_grads))
    # ... while replacing everything eligible does change the loss.
    changed, _ = grads(ss, ss.scheduled_inputs(batch, 1.0)[0])
    assert not torch.equal(loss, changed)


class Weights(L.Callback):
    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(torch.cat([p.detach().flatten().clone()
                                     for p in pl_module.model.parameters()]))


def fit(ss, steps: int = 4):
    m = module(ss, dropout=0.1, seed=0)  # dropout: any extra random draw would show
    weights = Weights()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[weights])
    batch = structured_batch()
    data = [{k: v[i % 4] for k, v in batch.items()} for i in range(steps * 2)]
    trainer.fit(m, torch.utils.data.DataLoader(data, batch_size=2))
    return weights.after, trainer, torch.get_rng_state()


def test_eps_zero_training_run_is_bit_identical():
    plain, _, plain_rng = fit(None)
    zero, trainer, zero_rng = fit({"schedule": "exponential", "eps_start": 0.0, "eps_end": 0.0})
    assert all(torch.equal(a, b) for a, b in zip(plain, zero, strict=True))
    assert torch.equal(plain_rng, zero_rng)
    assert trainer.callback_metrics["train/ss_eps"] == 0
    on, trainer, _ = fit({"schedule": "linear", "eps_start": 0.5, "eps_end": 1.0, "steps": 4})
    assert not torch.equal(on[-1], plain[-1])
    assert trainer.callback_metrics["train/ss_eps"] == pytest.approx(0.875)  # step 3 of 4
    assert 0 < trainer.callback_metrics["train/ss_replaced"] <= 1


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_second_pass_sees_the_prediction_exactly_where_replaced(mode):
    batch = structured_batch()
    eligible = eligible_inputs(batch)
    m = module({"schedule": "linear", "mode": mode})
    recorded = []
    object.__setattr__(m, "forward_fn", sentinel_forward(recorded))
    inputs = batch["tokens"][:, :-1]
    for eps in (1.0, 0.5):
        torch.manual_seed(1)
        mixed, fraction = m.scheduled_inputs(batch, eps)
        replaced = mixed["inputs"] == SENTINEL
        assert torch.equal(mixed["tokens"], batch["tokens"])  # the loss keeps the true targets
        # The sentinel exactly at the replaced positions, the true tokens everywhere else.
        assert torch.equal(mixed["inputs"][~replaced], inputs[~replaced])
        assert not (replaced & ~eligible).any()  # never a pad, first token or structure
        if eps == 1.0:
            assert torch.equal(replaced, eligible)  # every eligible position
        else:
            assert 0 < replaced.sum() < eligible.sum()
        learned = (shift_targets(batch["tokens"], batch["loss_mask"], PAD)[1] != IGNORE_INDEX)
        assert fraction == pytest.approx(replaced.sum().item() / learned.sum().item())
        # The loss pass reads exactly those inputs and scores the true targets.
        recorded.clear()
        _, targets = m.token_nll(mixed)
        assert len(recorded) == 1 and torch.equal(recorded[0], mixed["inputs"])
        assert torch.equal(targets, shift_targets(batch["tokens"], batch["loss_mask"],
                                                  PAD)[1].flatten())


def test_multi_stream_slots_are_replaced_on_their_own():
    torch.manual_seed(2)
    tokens = torch.randint(*CONTENT, (3, 2, 11))
    tokens[tokens == SENTINEL] = SENTINEL + 1
    tokens[:, :, 0] = 1
    tokens[:, 1, 1] = PAD  # the delay pattern's empty slot
    tokens[0, 0, 6] = 4
    batch = {"tokens": tokens, "loss_mask": torch.ones_like(tokens, dtype=torch.bool)}
    m = module({"schedule": "linear"}, n_streams=2)
    mixed, _ = m.scheduled_inputs(batch, 1.0)
    replaced = mixed["inputs"] != tokens[..., :-1]
    eligible = eligible_inputs(batch)
    assert not (replaced & ~eligible).any()
    assert (mixed["inputs"][eligible] >= CONTENT[0]).all()
    assert (mixed["inputs"][eligible] < CONTENT[1]).all()
    assert m.loss(mixed)[0].isfinite()
    recorded = []
    object.__setattr__(m, "forward_fn", sentinel_forward(recorded))  # (B, K, T, V) logits
    mixed, _ = m.scheduled_inputs(batch, 1.0)
    assert torch.equal(mixed["inputs"] == SENTINEL, eligible)


@pytest.mark.parametrize("mode", ["sample", "argmax"])
@pytest.mark.parametrize("eps", [0.7, 1.0])
def test_no_future_leakage(mode, eps):
    """Changing the true tokens after input t leaves the second pass's inputs and logits at
    <= t as they were; and the replacement at t + 1 (eps = 1: all eligible ones are replaced)
    does not depend on the true token it replaces."""
    m = module({"schedule": "linear", "mode": mode})
    batch = structured_batch()
    changed = {k: v.clone() for k, v in batch.items()}
    t = 7  # input t + 1 holds a learned content token in every row
    g = torch.Generator().manual_seed(9)
    future = changed["tokens"][:, t + 1:]
    future.copy_(torch.randint(0, VOCAB, future.shape, generator=g))  # content, structure, pads
    changed["tokens"][:, t + 1] = (batch["tokens"][:, t + 1] - CONTENT[0] + 1) \
        % (CONTENT[1] - CONTENT[0]) + CONTENT[0]  # another content token
    assert (eligible_inputs(batch)[:, t + 1]).all() and (eligible_inputs(changed)[:, t + 1]).all()
    outs = []
    for b in (batch, changed):
        torch.manual_seed(5)
        mixed, _ = m.scheduled_inputs(b, eps)
        with torch.no_grad():
            outs.append((mixed["inputs"], m(mixed["inputs"])))
    (inputs_a, logits_a), (inputs_b, logits_b) = outs
    seen = t + 2 if eps == 1.0 else t + 1
    assert torch.equal(inputs_a[:, :seen], inputs_b[:, :seen])
    assert (inputs_a[:, :t + 1] != batch["tokens"][:, :t + 1]).any()  # some were replaced
    torch.testing.assert_close(logits_a[:, :seen], logits_b[:, :seen], rtol=0, atol=1e-6)


def test_train_end_to_end_logs_eps(tmp_path, corpus_file, quick_overrides):
    from armodal.train import train

    cfg = compose_config(RECIPES_DIR, "text_char_shakespeare", [
        f"domain.source.path={corpus_file}", *quick_overrides(tmp_path, steps=6),
        "sample_every_validation=false", "trainer.log_every_n_steps=1",
        "scheduled_sampling.schedule=linear", "scheduled_sampling.eps_end=0.5",
        "scheduled_sampling.steps=4", "scheduled_sampling.mode=argmax"])
    result = train(cfg)
    assert result.module.scheduled_sampling.schedule == "linear"
    assert result.module.content_ids == (3, result.datamodule.space.vocab_size)
    lines = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    eps = [float(r["train/ss_eps"]) for r in rows if r.get("train/ss_eps")]
    assert eps == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])
    replaced = [float(r["train/ss_replaced"]) for r in rows if r.get("train/ss_replaced")]
    assert replaced[0] == 0 and all(0 < r < 0.7 for r in replaced[2:])
