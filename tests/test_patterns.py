"""Stream patterns: bijections between (K, T) code grids and model-step layouts."""

import pytest
import torch

from armodal.tokenizers.patterns import PATTERN_KINDS, stream_pattern

K, CB = 3, 5


@pytest.mark.parametrize("kind", PATTERN_KINDS)
@pytest.mark.parametrize("n_frames", [1, 2, 7])
def test_apply_revert_is_a_bijection(kind, n_frames):
    p = stream_pattern(kind, K, CB)
    g = torch.Generator().manual_seed(n_frames)
    codes = torch.randint(0, CB, (K, n_frames), generator=g)
    laid = p.apply(codes, fill=-1)
    assert laid.shape == (p.n_streams, p.length(n_frames))
    assert p.frames(laid.shape[-1]) == n_frames
    assert torch.equal(p.revert(laid), codes)
    # Batched over leading dims, each item laid out as alone.
    batch = torch.randint(0, CB, (2, 4, K, n_frames), generator=g)
    laid_batch = p.apply(batch, fill=-1)
    assert laid_batch.shape == (2, 4, p.n_streams, p.length(n_frames))
    assert torch.equal(laid_batch[1, 2], p.apply(batch[1, 2], fill=-1))
    assert torch.equal(p.revert(laid_batch), batch)
    # Injective: distinct grids give distinct layouts (and every code is somewhere in it).
    flat = laid_batch.reshape(8, -1)
    grids = batch.reshape(8, -1)
    for i in range(8):
        for j in range(8):
            assert torch.equal(flat[i], flat[j]) == torch.equal(grids[i], grids[j])
    other = codes.clone()
    other[-1, -1] = (other[-1, -1] + 1) % CB
    assert not torch.equal(p.apply(other, fill=-1), laid)


@pytest.mark.parametrize("kind", PATTERN_KINDS)
def test_slot_maps_agree_with_apply(kind):
    p, n_frames = stream_pattern(kind, K, CB), 4
    frames, levels = p.slot_frames(n_frames), p.slot_levels(n_frames)
    assert frames.shape == levels.shape == (p.n_streams, p.length(n_frames))
    assert torch.equal(frames < 0, levels < 0)
    # A grid whose code names its own (level, frame) shows where apply put each code.
    level_grid = torch.arange(K)[:, None].expand(K, n_frames)
    frame_grid = torch.arange(n_frames)[None].expand(K, n_frames)
    shift = torch.where(levels < 0, 0, levels * (CB if kind == "flatten" else 0))
    assert torch.equal(p.apply(frame_grid, fill=-1), frames + shift)
    assert torch.equal(p.apply(level_grid, fill=-1), levels + shift)
    # Every (level, frame) occupies exactly one slot.
    held = levels[levels >= 0] * n_frames + frames[frames >= 0]
    assert torch.equal(held.sort().values, torch.arange(K * n_frames))


def test_shapes_streams_and_vocab():
    flat, delay, par = (stream_pattern(k, K, CB) for k in ("flatten", "delay", "parallel"))
    assert (flat.n_streams, flat.vocab_size, flat.length(4)) == (1, K * CB, K * 4)
    assert (delay.n_streams, delay.vocab_size, delay.length(4)) == (K, CB, 4 + K - 1)
    assert (par.n_streams, par.vocab_size, par.length(4)) == (K, CB, 4)
    assert delay.frames(K - 1) == 0
    assert delay.apply(torch.zeros(K, 0, dtype=torch.long), fill=9).eq(9).all()
    with pytest.raises(ValueError, match="whole number of frames"):
        flat.frames(K * 2 + 1)
    with pytest.raises(ValueError, match="whole number of frames"):
        delay.frames(K - 2)


def test_flatten_gives_each_level_its_own_id_range():
    p = stream_pattern("flatten", K, CB)
    codes = torch.randint(0, CB, (K, 6))
    laid = p.apply(codes, fill=-1)[0]  # (K*T,)
    levels = p.slot_levels(6)[0]
    assert torch.equal(levels, torch.arange(K * 6) % K)  # frame t's levels are consecutive
    assert ((laid >= levels * CB) & (laid < (levels + 1) * CB)).all()
    assert laid.max() < p.vocab_size


def test_delay_layout_and_generation_order():
    p, n_frames = stream_pattern("delay", K, CB), 5
    codes = torch.arange(K * n_frames).view(K, n_frames)
    laid = p.apply(codes, fill=-1)
    assert laid.shape == (K, n_frames + K - 1)
    for k in range(K):
        assert torch.equal(laid[k, k:k + n_frames], codes[k])  # level k shifted by k
        assert (laid[k, :k] == -1).all() and (laid[k, k + n_frames:] == -1).all()
    frames, levels = p.slot_frames(n_frames), p.slot_levels(n_frames)
    step_of = {}  # (level, frame) -> the step that produces it
    for j, s in (frames >= 0).nonzero().tolist():
        step_of[(int(levels[j, s]), int(frames[j, s]))] = s
    for (k, t), s in step_of.items():
        assert s == t + k
        assert all(step_of[(k, later)] > s for later in range(t + 1, n_frames))
        assert all(step_of[(lower, t)] < s for lower in range(k))


def test_bad_kind_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="'zigzag'.*flatten, delay, parallel"):
        stream_pattern("zigzag", K, CB)
    with pytest.raises(ValueError, match="n_levels"):
        stream_pattern("delay", 0, CB)
    p = stream_pattern("delay", K, CB)
    with pytest.raises(ValueError, match=r"codes must have shape \(\.\.\., K, T\)"):
        p.apply(torch.zeros(K + 1, 4, dtype=torch.long), fill=-1)
    with pytest.raises(ValueError, match="laid must have shape"):
        p.revert(torch.zeros(K + 1, 4, dtype=torch.long))
