"""Context extension at inference: a model read past its trained length, and the loss by
position that shows what that costs (issue 11)."""

from __future__ import annotations

import pytest
import torch

from armodal.checkpoint import load_run
from armodal.cli import RECIPES_DIR, compose_config, main
from armodal.evaluate import evaluate
from armodal.longcontext import extend_context
from armodal.model import ModelConfig, Transformer
from armodal.train import train


def tiny_model(**kwargs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32,
                                   max_seq_len=16, init_std=0.2, **kwargs)).eval()


def logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def test_plain_extension_leaves_the_trained_positions_alone():
    """Causal attention and unscaled RoPE: the first 16 positions of a 64-position read are
    what the model gave at 16, and the model now accepts 64."""
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(1))
    before = logits(model, ids[:, :16])
    with pytest.raises(ValueError, match="exceeds the limit of 16"):
        logits(model, ids)
    extend_context(model, 64)
    assert model.config.max_seq_len == 64 and model.config.rope_scaling is None
    assert torch.equal(logits(model, ids)[:, :16], before)


@pytest.mark.parametrize("scaling", ["linear", "ntk", "yarn"])
def test_scaled_extension_is_the_scaled_model_on_the_same_weights(scaling):
    model = tiny_model()
    built = tiny_model(rope_scaling=scaling, rope_factor=4.0, rope_original_len=16)
    built.set_positions(ModelConfig(**{**built.config.to_dict(), "max_seq_len": 64}))
    extend_context(model, 64, scaling)  # factor: 64 / 16
    assert model.config.rope_factor == 4.0 and model.config.rope_original_len == 16
    ids = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(model, ids), logits(built, ids))
    # and it is not plain RoPE: the scaling changed what the model computes
    assert not torch.allclose(logits(model, ids), logits(extend_context(tiny_model(), 64), ids))


def test_cached_decoding_past_the_trained_length_equals_a_full_forward():
    model = extend_context(tiny_model(), 48, "yarn")
    ids = torch.randint(0, 50, (1, 48), generator=torch.Generator().manual_seed(3))
    full = logits(model, ids)
    cache = model.new_cache(1)
    with torch.no_grad():
        steps = [model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache)
                                                    for t in range(8, 48)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_bad_extensions_are_refused():
    with pytest.raises(ValueError, match="rope scaling 'rope2'"):
        extend_context(tiny_model(), 64, "rope2")
    with pytest.raises(ValueError, match="context=0"):
        extend_context(tiny_model(), 0)
    with pytest.raises(ValueError, match="rope_factor must be >= 1"):
        extend_context(tiny_model(), 64, "linear", 0.5)


def test_eval_reports_the_loss_by_position_bucket(char_run):
    trained = load_run(char_run.run_dir).model.config.max_seq_len  # 64
    at_trained = evaluate(str(char_run.run_dir))
    assert at_trained.context == trained and len(at_trained.by_position) == 1
    assert at_trained.by_position[0]["nll"] == pytest.approx(at_trained.nll)
    for scaling in (None, "yarn"):
        longer = evaluate(str(char_run.run_dir), context=4 * trained, rope_scaling=scaling)
        buckets = longer.by_position
        assert [(b["from"], b["to"]) for b in buckets] == \
            [(0, 64), (64, 128), (128, 192), (192, 256)]
        assert longer.nll == pytest.approx(sum(b["nll"] for b in buckets) / 4)  # equal counts
    # plain RoPE, positions 0..63 of each long window see what they saw in training
    plain = evaluate(str(char_run.run_dir), context=4 * trained)
    assert plain.by_position[0]["nll"] == pytest.approx(at_trained.nll, rel=0.05)


def test_cli_eval_prints_the_position_table(char_run, capsys):
    main(["eval", f"run={char_run.run_dir}", "context=128", "rope.scaling=yarn"])
    out = capsys.readouterr().out
    assert "positions" in out and "     64-127" in out
    with pytest.raises(SystemExit):
        main(["eval", f"run={char_run.run_dir}", "context=128", "rope.scaling=rope2"])
    assert "rope scaling 'rope2'" in capsys.readouterr().err


def test_init_from_fine_tunes_a_run_at_a_longer_context(char_run, corpus_file, tmp_path,
                                                        quick_overrides):
    """init_from starts a run from a finished run's weights: here at twice the context with
    YaRN (lr ~0, so the result still holds the starting weights)."""
    start = load_run(char_run.run_dir)
    overrides = [f"domain.source.path={corpus_file}", *quick_overrides(tmp_path, steps=2),
                 f"init_from={char_run.run_dir}", "domain.data.seq_len=128",
                 "model.rope_scaling=yarn", "model.rope_factor=2.0", "model.rope_original_len=64",
                 "optim.optimizer.lr=1e-12", "sample_every_validation=false"]
    train(compose_config(RECIPES_DIR, "text_char_shakespeare", overrides))
    tuned = load_run(tmp_path / "run")
    assert tuned.model.config.max_seq_len == 128 and tuned.model.config.rope_scaling == "yarn"
    for name, tensor in start.model.state_dict().items():
        torch.testing.assert_close(tuned.model.state_dict()[name], tensor, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="do not match this model"):
        train(compose_config(RECIPES_DIR, "text_char_shakespeare",
                             [*overrides, "model=small", f"run_dir={tmp_path / 'other'}"]))
