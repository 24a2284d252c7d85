"""The actions domain: episode files, scripted experts and rollouts, the trajectory tokenizer,
the data module's windows, the closed-loop policy (cache under injection, batching, valid
actions) and the evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from armodal.control.evaluate import Stateless, behaviour_cloning, play
from armodal.control.experts import noisy, scripted_expert
from armodal.control.policy import SequencePolicy
from armodal.control.rollout import Rollouts, make_env, rollout
from armodal.data.action_module import ActionDataModule
from armodal.data.episodes import Episode, EpisodeFolder, load_episode, save_episode
from armodal.generation.config import DecodingConfig
from armodal.model import ModelConfig, Transformer
from armodal.tokenizers.action import BinTokenizer, DiscreteTokenizer
from armodal.tokenizers.base import check_tokenizer, tokenizer_from_config
from armodal.tokenizers.trajectory import TrajectoryTokenizer


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
    """24 CartPole episodes: the expert and noisy versions (short and long episodes)."""
    cache = tmp_path_factory.mktemp("episodes")
    return Rollouts("CartPole-v1", 24, [0.0, 0.5, 1.0], cache_dir=str(cache))


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory):
    cache = tmp_path_factory.mktemp("episodes")
    return Rollouts("Pendulum-v1", 6, [0.0, 1.0], cache_dir=str(cache))


def trajectory(discrete: bool, returns: bool = True) -> TrajectoryTokenizer:
    action = DiscreteTokenizer(2) if discrete else BinTokenizer("action", 16, low=[-2.0],
                                                                high=[2.0])
    return TrajectoryTokenizer(BinTokenizer("observation", 32, "quantile"), action,
                               BinTokenizer("return", 16) if returns else None)


def tiny_model(tok: TrajectoryTokenizer, context: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tok.space.vocab_size, n_layer=2, n_head=2, d_model=32,
                         max_seq_len=context * tok.group - 1)
    return Transformer(config).eval()


# --- episode files, experts, rollouts -------------------------------------------------------

def test_episode_file_round_trip_and_returns_to_go(tmp_path):
    ep = Episode(np.arange(6, dtype=np.float32).reshape(3, 2), np.array([0, 1, 1]),
                 np.array([1.0, 2.0, 3.0]), {"env_id": "CartPole-v1", "seed": 4})
    back = load_episode(save_episode(tmp_path / "a.npz", ep))
    np.testing.assert_array_equal(back.observations, ep.observations)
    np.testing.assert_array_equal(back.actions, ep.actions)
    assert back.discrete and back.meta["seed"] == 4 and back.episode_return == 6.0
    np.testing.assert_allclose(back.returns_to_go(), [6.0, 5.0, 3.0])


@pytest.mark.parametrize("broken,match", [
    (lambda d: d.pop("rewards"), "lacks rewards"),
    (lambda d: d.update(actions=np.zeros((4, 1))), r"actions must be \(T=3"),
    (lambda d: d.update(observations=np.full((3, 2), np.nan)), "NaN"),
    (lambda d: d.update(meta=json.dumps({"seed": 1})), "no env_id"),
    (lambda d: d.update(meta="not json"), "not a JSON"),
])
def test_episode_file_errors_name_the_problem(tmp_path, broken, match):
    fields = {"observations": np.zeros((3, 2)), "actions": np.zeros(3, np.int64),
              "rewards": np.ones(3), "meta": json.dumps({"env_id": "CartPole-v1"})}
    broken(fields)
    np.savez(tmp_path / "bad.npz", **fields)
    with pytest.raises(ValueError, match=match):
        load_episode(tmp_path / "bad.npz")


def test_episode_folder_refuses_empty_and_mixed_folders(tmp_path, cartpole, pendulum):
    with pytest.raises(FileNotFoundError, match="no .npz"):
        EpisodeFolder(str(tmp_path)).load()
    save_episode(tmp_path / "a.npz", cartpole.load()[0])
    save_episode(tmp_path / "b.npz", pendulum.load()[0])
    with pytest.raises(ValueError, match="mixes episodes"):
        EpisodeFolder(str(tmp_path)).load()


def test_experts_solve_their_tasks():
    env = make_env("CartPole-v1")
    assert rollout(env, scripted_expert("CartPole-v1"), seed=3).episode_return == 500.0
    env = make_env("Pendulum-v1")
    returns = [rollout(env, scripted_expert("Pendulum-v1"), seed=s).episode_return
               for s in range(3)]
    assert np.mean(returns) > -400  # a random policy scores about -1200
    env = make_env("Acrobot-v1")
    assert rollout(env, scripted_expert("Acrobot-v1"), seed=0).episode_return > -200


def test_noise_keeps_actions_valid_and_mixes_returns(cartpole):
    env = make_env("Pendulum-v1")
    policy = noisy(scripted_expert("Pendulum-v1"), env.action_space, 2.0,
                   np.random.default_rng(0))
    actions = policy(np.random.default_rng(1).normal(size=(500, 3)).astype(np.float32))
    assert actions.shape == (500, 1) and np.abs(actions).max() <= 2.0
    assert actions.std() > 1.0  # noise of two half-ranges: far from the expert
    returns = {ep.meta["noise"]: ep.episode_return for ep in cartpole.load()}
    assert returns[0.0] == 500.0 and returns[1.0] < 100


def test_unknown_environment_and_expert_are_refused():
    with pytest.raises(ValueError, match="unknown environment id 'NoSuchEnv-v0'"):
        make_env("NoSuchEnv-v0")
    with pytest.raises(ValueError, match="no scripted expert for env_id='MountainCar-v0'"):
        Rollouts("MountainCar-v0")


def test_rollouts_are_built_once_and_reproducible(cartpole, tmp_path):
    first = cartpole.load()
    stamp = (cartpole.path / "meta.json").stat().st_mtime_ns
    again = cartpole.load()
    assert (cartpole.path / "meta.json").stat().st_mtime_ns == stamp  # read, not rebuilt
    fresh = Rollouts("CartPole-v1", 24, [0.0, 0.5, 1.0], cache_dir=str(tmp_path)).load()
    for a, b, c in zip(first, again, fresh):
        np.testing.assert_array_equal(a.actions, c.actions)
        np.testing.assert_array_equal(a.observations, b.observations)


# --- the trajectory tokenizer ---------------------------------------------------------------

@pytest.mark.parametrize("discrete", [True, False])
def test_trajectory_tokenizer_conformance_and_layout(discrete, cartpole, pendulum):
    episodes = (cartpole if discrete else pendulum).load()
    tok = trajectory(discrete)
    tok.fit(episodes)
    check_tokenizer(tok, episodes[:2])
    space, dims = tok.space, tok.dims()
    assert list(space.modalities) == ["return", "observation", "action"]
    assert tok.group == 1 + dims["observation"] + 1
    ids = tok.episode_ids(episodes[0])  # (T, G): [return] [observation dims] [action]
    assert ids.shape == (episodes[0].length, tok.group)
    owners = [space.split(row) for row in ids[:3]]
    for row in owners:
        assert [m for m, _ in row] == ["return", "observation", "action"]
    # Each observation dimension has its own id range (the flatten pattern's levels).
    obs = ids[:, 1:1 + dims["observation"]] - space.offset("observation")
    for k in range(dims["observation"]):
        assert ((obs[:, k] >= 32 * k) & (obs[:, k] < 32 * (k + 1))).all()


def test_trajectory_decode_is_within_half_a_bin(pendulum):
    episodes = pendulum.load()
    tok = trajectory(discrete=False)
    tok.fit(episodes)
    ep = episodes[0]
    back = tok.decode(tok.encode(ep))
    for name, values, part in (("observations", ep.observations, "observation"),
                               ("actions", ep.actions, "action"),
                               ("returns_to_go", ep.returns_to_go()[:, None], "return")):
        edges = tok.parts[part].bin_edges  # (D, n_bins + 1)
        half = (edges[:, 1:] - edges[:, :-1]).max(1) / 2
        decoded = back[name].reshape(values.shape)
        assert (np.abs(decoded - values) <= half + 1e-5).all(), name


def test_trajectory_config_round_trip_keeps_the_fit(pendulum):
    episodes = pendulum.load()
    tok = trajectory(discrete=False)
    tok.fit(episodes)
    rebuilt = tokenizer_from_config(json.loads(json.dumps(tok.config())))
    assert torch.equal(rebuilt.encode(episodes[1]), tok.encode(episodes[1]))
    assert rebuilt.space.to_dict() == tok.space.to_dict()
    assert not trajectory(discrete=False, returns=False).has_returns
    with pytest.raises(ValueError, match="not fitted"):
        trajectory(discrete=True).encode(episodes[0])
    with pytest.raises(ValueError, match="modality 'action'; set modality: observation"):
        TrajectoryTokenizer(DiscreteTokenizer(2), DiscreteTokenizer(2))


# --- the data module ------------------------------------------------------------------------

@pytest.mark.parametrize("loss_on", ["actions", "all"])
def test_windows_start_at_timesteps_and_learn_what_is_asked(cartpole, loss_on):
    dm = ActionDataModule(cartpole, trajectory(discrete=True), batch_size=4, context=6,
                          loss_on=loss_on, val_fraction=0.25)
    dm.prepare_shards()
    dm.setup()
    tok, space = dm.tokenizer, dm.space
    assert dm.seq_len == 6 * tok.group - 1
    batch = next(iter(dm.train_dataloader()))
    tokens, mask = batch["tokens"], batch["loss_mask"]  # (B, 6 * G)
    assert tokens.shape == (4, 6 * tok.group)
    steps = tokens.view(4, 6, tok.group)
    real = steps[..., 0] != space.pad_id  # (B, 6) timesteps that are not padding
    returns = steps[..., 0][real]
    assert ((returns >= space.offset("return")) & (returns < space.offset("observation"))).all()
    action = steps[..., -1][real]
    assert ((action >= space.offset("action")) & (action < space.vocab_size)).all()
    learned = mask.view(4, 6, tok.group)
    if loss_on == "actions":
        assert learned[..., :-1].sum() == 0 and torch.equal(learned[..., -1], real)
    else:
        assert torch.equal(learned, real[..., None].expand_as(learned))
    # Val windows cover every val step exactly once.
    n_val = sum(ep.length for ep in dm.val_episodes)
    val_steps = sum(int((w["tokens"].view(6, -1)[:, 0] != space.pad_id).sum())
                    for w in dm.val_set)
    assert val_steps == n_val


def test_short_episodes_are_padded_without_loss(tmp_path):
    eps = [Episode(np.zeros((n, 2)), np.zeros(n, np.int64), np.ones(n),
                   {"env_id": "CartPole-v1"}) for n in (2, 3, 9, 9)]
    for i, ep in enumerate(eps):
        save_episode(tmp_path / f"{i}.npz", ep)
    dm = ActionDataModule(EpisodeFolder(str(tmp_path)), trajectory(True), batch_size=2,
                          context=5, val_fraction=0.25, split="tail")
    dm.prepare_shards()
    dm.setup()
    short = dm.train_set[0]  # the 2-step episode: 2 real timesteps, 3 of padding
    tokens = short["tokens"].view(5, -1)
    assert (tokens[2:] == dm.space.pad_id).all() and not short["loss_mask"].view(5, -1)[2:].any()


def test_data_module_refuses_bad_settings(cartpole):
    with pytest.raises(ValueError, match="loss_on='obs'"):
        ActionDataModule(cartpole, trajectory(True), batch_size=2, loss_on="obs")
    with pytest.raises(ValueError, match="context must be an int >= 1"):
        ActionDataModule(cartpole, trajectory(True), batch_size=2, context=0)


# --- the closed-loop policy -----------------------------------------------------------------

def fitted(source, discrete: bool) -> TrajectoryTokenizer:
    tok = trajectory(discrete)
    tok.fit(source.load())
    return tok


@pytest.mark.parametrize("discrete", [True, False])
def test_injected_observations_match_a_fresh_forward(discrete, cartpole, pendulum):
    """Cache correctness under injection: at every decision, the cached logits equal an
    uncached forward over the same context, through several slides of the window."""
    source, env_id = (cartpole, "CartPole-v1") if discrete else (pendulum, "Pendulum-v1")
    tok = fitted(source, discrete)
    model = tiny_model(tok, context=4)
    policy = SequencePolicy(model, tok, context=4)
    envs = [make_env(env_id) for _ in range(2)]
    obs = np.stack([env.reset(seed=s)[0] for s, env in enumerate(envs)])
    policy.reset(obs, target_return=100.0)
    lengths = set()
    for _ in range(11):
        actions = policy.act()
        context = policy.decision_context()
        lengths.add(context.shape[1])
        with torch.inference_mode():
            fresh = model(context)[:, -1]
        torch.testing.assert_close(policy.last_logits, fresh, atol=1e-5, rtol=1e-5)
        steps = [env.step(a) for env, a in zip(envs, actions)]
        policy.observe(np.stack([s[0] for s in steps]), np.array([s[1] for s in steps]))
    assert max(lengths) <= model.config.max_seq_len and len(lengths) >= 3  # it slid


def test_policy_emits_valid_actions_only(pendulum):
    tok = fitted(pendulum, discrete=False)
    model = tiny_model(tok, context=3)
    with torch.no_grad():  # favour ids outside the action range: masks must keep them out
        model.head.weight[: tok.space.offset("action")] += 0.5
    policy = SequencePolicy(model, tok, context=3,
                            decoding=DecodingConfig(strategy="sample", temperature=2.0, seed=0))
    score = play(policy, "Pendulum-v1", [0, 1, 2], batch_size=3, name="tiny",
                 target_return=-150.0)
    assert score.steps == 600  # every episode ran its 200 steps: each action was accepted
    policy.reset(np.zeros((2, 3), np.float32), -150.0)
    for _ in range(20):
        actions = policy.act()
        assert actions.shape == (2, 1) and (np.abs(actions) <= 2.0).all()
        policy.observe(np.zeros((2, 3), np.float32), np.zeros(2))


def test_batched_policy_equals_one_environment_at_a_time(cartpole):
    tok = fitted(cartpole, discrete=True)
    model = tiny_model(tok, context=5, seed=1)
    policy = SequencePolicy(model, tok, context=5)
    batched = play(policy, "CartPole-v1", [5, 6, 7], batch_size=3, name="b3", target_return=300)
    single = play(policy, "CartPole-v1", [5, 6, 7], batch_size=1, name="b1", target_return=300)
    assert batched.returns == single.returns and batched.steps == single.steps


def test_policy_refuses_misuse(cartpole):
    tok = fitted(cartpole, discrete=True)
    policy = SequencePolicy(tiny_model(tok, context=3), tok, context=3)
    with pytest.raises(ValueError, match="pass target_return"):
        policy.reset(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"observations must be \(B, 4\), got shape \(1, 3\)"):
        policy.reset(np.zeros((1, 3)), 100.0)
    policy.reset(np.zeros((2, 4)), 100.0)
    with pytest.raises(ValueError, match="observe\\(\\) follows act"):
        policy.observe(np.zeros((2, 4)), np.zeros(2))
    policy.act()
    with pytest.raises(ValueError, match="the episode batch has 2"):
        policy.observe(np.zeros((3, 4)), np.zeros(3))
    with pytest.raises(ValueError, match="need max_seq_len >= 35"):
        SequencePolicy(tiny_model(tok, context=3), tok, context=6)


# --- evaluation -----------------------------------------------------------------------------

def test_play_and_behaviour_cloning_on_the_same_seeds(cartpole):
    expert = play(Stateless(scripted_expert("CartPole-v1")), "CartPole-v1", [0, 1], 2, "expert")
    assert expert.returns == [500.0, 500.0] and expert.steps == 1000
    bc = behaviour_cloning(cartpole.load(), max_iter=20)
    actions = bc(np.zeros((3, 4), np.float32))
    assert actions.shape == (3,) and set(actions.tolist()) <= {0, 1}


def test_train_then_eval_an_action_run_from_the_cli(tmp_path, capsys):
    """The recipe trains end to end (tiny model, a few steps); `armodal eval` on the run plays
    seeded episodes and prints the table with the expert and BC rows on the same seeds."""
    from armodal.checkpoint import load_run
    from armodal.cli import RECIPES_DIR, compose_config, main
    from armodal.control.evaluate import evaluate_run
    from armodal.train import train

    cfg = compose_config(RECIPES_DIR, "actions_cartpole", [
        "model=tiny", "trainer.max_steps=12", "trainer.val_check_interval=12",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "domain.episodes.n_episodes=14", f"domain.episodes.cache_dir={tmp_path / 'episodes'}",
        "domain.data.batch_size=8", "domain.data.context=4", f"run_dir={tmp_path / 'run'}",
        "optim.scheduler.warmup_steps=2"])
    result = train(cfg)
    assert "val/return" in result.metrics  # the closed-loop callback played episodes
    run = load_run(result.run_dir)
    assert run.meta["action"]["env_id"] == "CartPole-v1" and run.meta["action"]["context"] == 4
    once = evaluate_run(run, episodes=2, batch_size=2, target_return=[20, 500], baselines=False)
    again = evaluate_run(run, episodes=2, batch_size=1, target_return=[20, 500], baselines=False)
    assert [s.returns for s in once.scores] == [s.returns for s in again.scores]
    main(["eval", f"run={result.run_dir}", "actions.episodes=2", "actions.batch_size=2"])
    out = capsys.readouterr().out
    table, record = out.rsplit("\n", 2)[0], json.loads(out.strip().splitlines()[-1])
    assert "scripted expert" in table and "behaviour cloning (MLP)" in table
    expert = next(s for s in record["scores"] if s["policy"] == "scripted expert")
    assert expert["returns"] == [500.0, 500.0] and record["env_id"] == "CartPole-v1"
    for refused in (["eval", f"run={result.run_dir}", "data=README.md"],
                    ["generate", f"run={result.run_dir}"]):
        with pytest.raises(SystemExit):
            main(refused)
        assert "an action run" in capsys.readouterr().err
