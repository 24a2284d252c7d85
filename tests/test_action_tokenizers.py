import json
import warnings

import numpy as np
import pytest
import torch

from armodal.tokenizers.action import BIN_SCHEMES, BinTokenizer, DiscreteTokenizer
from armodal.tokenizers.base import TrainableTokenizer, check_tokenizer, tokenizer_from_config


def _data(seed: int = 0, n: int = 2000, d: int = 3) -> np.ndarray:
    """(n, d): a normal, a skewed and a bounded dimension, so the schemes place bins differently."""
    rng = np.random.default_rng(seed)
    cols = [rng.normal(0, 1, n), rng.exponential(2.0, n) - 1.0, rng.uniform(-2, 2, n)][:d]
    return np.stack(cols, axis=1)


def _fitted(scheme: str, n_bins: int = 32, **kw) -> BinTokenizer:
    tok = BinTokenizer(n_bins=n_bins, scheme=scheme, **kw)
    tok.fit(np.split(_data(), 4))  # several (T, D) samples
    return tok


def _contains(tok: BinTokenizer, x: np.ndarray, ids: np.ndarray) -> None:
    """Every x[n, k] lies in its bin's [lo, hi], and centre decoding is within half a bin."""
    edges = tok.bin_edges
    k = np.arange(x.shape[1])
    lo, hi = edges[k, ids], edges[k, ids + 1]
    assert (lo <= x).all() and (x <= hi).all()
    back = tok.decode_array(ids)
    assert (np.abs(back - x) <= (hi - lo) / 2 + 1e-6).all()


# ---------------------------------------------------------------- conformance


@pytest.mark.parametrize("scheme", BIN_SCHEMES)
def test_conformance_bin(scheme):
    tok = _fitted(scheme)
    assert isinstance(tok, TrainableTokenizer)
    samples = [_data(1, 17), torch.tensor(_data(2, 5), dtype=torch.float32), _data(3, 1)[0]]
    check_tokenizer(tok, samples)
    assert tok.encode(samples[0]).shape == (3, 17)
    assert tok.encode(samples[2]).shape == (3, 1)  # a (D,) vector is one step
    assert tok.decode(tok.encode(samples[0])).shape == (17, 3)
    assert tok.count_units(samples[0]) == 17 * 3


def test_conformance_discrete():
    tok = DiscreteTokenizer(6)
    samples = [np.array([0, 5, 2, 2, 1]), np.array([3]), np.arange(6)]
    check_tokenizer(tok, samples)
    assert tok.encode(samples[0]).shape == (1, 5)
    assert tok.encode(4).tolist() == [[4]]
    assert tok.count_units(samples[0]) == 5 and tok.count_units(torch.tensor([1, 2])) == 2


def test_conformance_return_modality_one_dim():
    tok = BinTokenizer(modality="return", n_bins=16, low=[0.0], high=[100.0])
    assert tok.is_fitted and tok.dim == 1  # per-dim bounds need no fit
    check_tokenizer(tok, [np.array([[0.0], [37.5], [100.0]])])
    with pytest.raises(ValueError, match=r"\(T, 1\)"):
        tok.encode(np.array([1.0, 2.0, 3.0]))


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("scheme", BIN_SCHEMES)
def test_round_trip_within_half_bin(scheme):
    tok = _fitted(scheme)
    x = _data(7, 500)
    lo, hi = tok.bin_edges[:, 0], tok.bin_edges[:, -1]
    x = x[((x >= lo) & (x <= hi)).all(1)]  # in-range values only
    ids = tok.encode_array(x)
    _contains(tok, x, ids)
    # The extremes themselves are in range and land in the outer bins.
    assert tok.encode_array(lo[None]).tolist() == [[0, 0, 0]]
    assert tok.encode_array(hi[None]).tolist() == [[31, 31, 31]]


@pytest.mark.parametrize("scheme", BIN_SCHEMES)
def test_fast_paths_agree(scheme):
    tok = _fitted(scheme)
    x = _data(5, 40)
    ids = tok.encode(x)
    assert np.array_equal(tok.encode_array(x), ids.numpy().T)
    assert tok.encode_array(x).dtype == np.int64
    back = tok.decode(ids)
    assert back.dtype == np.float32
    assert np.array_equal(back, tok.decode_array(ids.numpy().T))
    assert np.array_equal(back, tok.decode(ids.numpy()))

    disc = DiscreteTokenizer(4)
    acts = np.array([3, 0, 1, 1])
    assert np.array_equal(disc.encode_array(acts), disc.encode(acts).numpy().T)
    assert np.array_equal(disc.encode_array(acts[:, None]), disc.encode_array(acts))
    assert np.array_equal(disc.decode_array(acts[:, None]), disc.decode(disc.encode(acts)))
    assert disc.decode(torch.tensor([[2, 3]])).dtype == np.int64


# ---------------------------------------------------------------- schemes


def test_uniform_edges_given_and_fitted():
    tok = BinTokenizer(n_bins=4, low=[-1.0, 0.0], high=[1.0, 8.0])
    assert np.allclose(tok.bin_edges, [[-1, -0.5, 0, 0.5, 1], [0, 2, 4, 6, 8]])
    scalar = BinTokenizer(n_bins=4, low=-1.0, high=1.0)
    assert not scalar.is_fitted and scalar.dim is None
    scalar.fit([np.zeros((3, 5))])  # the dim comes from fit; the range from low/high
    assert scalar.dim == 5 and np.allclose(scalar.bin_edges[4], [-1, -0.5, 0, 0.5, 1])
    fitted = BinTokenizer(n_bins=4)
    fitted.fit([np.array([[0.0, 3.0], [4.0, 3.0]])])  # dimension 1 is constant
    edges = fitted.bin_edges
    assert np.allclose(edges[0], [0, 1, 2, 3, 4])
    assert (np.diff(edges[1]) > 0).all() and edges[1, 0] < 3.0 < edges[1, -1]
    assert fitted.decode(fitted.encode(np.array([2.5, 3.0])))[0] == pytest.approx([2.5, 3.0])


def test_quantile_equal_counts_on_continuous_data():
    tok = _fitted("quantile", n_bins=20)
    x = _data()
    edges = tok.bin_edges
    assert (np.diff(edges, axis=1) >= 0).all()
    assert (edges[:, 0] <= x.min(0)).all() and (edges[:, -1] >= x.max(0)).all()
    ids = tok.encode_array(x)
    for k in range(x.shape[1]):
        counts = np.bincount(ids[:, k], minlength=20)
        assert counts.min() >= 0.8 * len(x) / 20 and counts.max() <= 1.2 * len(x) / 20


def test_quantile_heavy_ties():
    rng = np.random.default_rng(1)
    x = rng.uniform(-2, 2, (1000, 2))
    x[rng.random(1000) < 0.4, 0] = 2.0  # actions saturated at the top
    x[rng.random(1000) < 0.3, 1] = 0.0  # ties in the middle
    tok = BinTokenizer(n_bins=16, scheme="quantile")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the training data is never out of range
        tok.fit([x])
        ids = tok.encode_array(x)
    edges = tok.bin_edges
    assert (np.diff(edges, axis=1) >= 0).all()
    assert (np.diff(edges[0]) == 0).sum() >= 5  # the saturated value gives zero-width bins
    assert (edges[:, 0] <= x.min(0)).all() and (edges[:, -1] >= x.max(0)).all()
    _contains(tok, x, ids)


def test_mulaw_finer_near_zero():
    tok = BinTokenizer(n_bins=64, scheme="mulaw", mu=100.0)
    tok.fit([np.random.default_rng(0).uniform(-3, 3, (500, 2))])
    widths = np.diff(tok.bin_edges, axis=1)
    assert (widths > 0).all()
    assert (widths[:, 32] * 10 < widths[:, 0]).all() and (widths[:, 31] * 10 < widths[:, -1]).all()
    scale = tok.bin_edges[:, -1]
    assert np.allclose(tok.bin_edges[:, 0], -scale) and np.allclose(tok.bin_edges[:, 32], 0.0)
    given = BinTokenizer(n_bins=8, scheme="mulaw", low=[-1.0], high=[4.0])
    assert given.bin_edges[0, 0] == -4.0 and given.bin_edges[0, -1] == 4.0  # symmetric scale


def test_decode_with_mean():
    # All training values of bin 0 of [0, 4) sit near its low edge: the mean is not the centre.
    x = np.array([[0.1], [0.1], [0.3], [2.9], [4.0]])
    tok = BinTokenizer(n_bins=4, low=[0.0], high=[4.0], decode_with="mean")
    centre = BinTokenizer(n_bins=4, low=[0.0], high=[4.0])
    assert tok.decode_array(np.array([[0]]))[0, 0] == 0.5  # before fit: no means yet
    tok.fit([x])
    ids = tok.encode_array(np.array([[0.5], [1.5], [2.5], [3.5]]))
    assert tok.decode_array(ids)[:, 0] == pytest.approx([0.5 / 3, 1.5, 2.9, 4.0])
    assert centre.decode_array(ids)[:, 0] == pytest.approx([0.5, 1.5, 2.5, 3.5])  # bin 1 empty
    rebuilt = tokenizer_from_config(json.loads(json.dumps(tok.config())))
    assert np.array_equal(rebuilt.decode_array(ids), tok.decode_array(ids))


# ---------------------------------------------------------------- errors


def test_out_of_range_clamp_warns_once():
    tok = BinTokenizer(n_bins=8, low=[-1.0, -1.0], high=[1.0, 1.0])
    x = np.array([[0.0, 1.5], [-7.25, 0.0], [0.0, 3.0]])
    with pytest.warns(UserWarning, match=r"-7\.25.*dimension 0.*\[-1\.0, 1\.0\]") as record:
        ids = tok.encode(x)
    assert len(record) == 1 and "'action'" in str(record[0].message)
    assert ids.tolist() == [[4, 0, 4], [7, 4, 7]]


def test_out_of_range_error():
    tok = BinTokenizer(modality="observation", n_bins=8, low=[-1.0], high=[1.0],
                       out_of_range="error")
    with pytest.raises(ValueError, match=r"'observation'.*worst 2\.5 in dimension 0"):
        tok.encode_array(np.array([[0.0], [2.5]]))
    with pytest.raises(ValueError, match="2.5"):
        tok.fit([np.array([[2.5]])])
    assert tok.bin_edges[0, -1] == 1.0  # a failed fit leaves the state alone


def test_bad_input_raises():
    tok = _fitted("uniform")
    with pytest.raises(ValueError, match=r"expected shape \(T, 3\) or \(3,\), got \(5, 4\)"):
        tok.encode(np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"got \(2, 2, 3\)"):
        tok.encode(np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"expected shape \(N, 3\)"):
        tok.encode_array(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="non-finite value nan at row 1, dimension 2"):
        tok.encode(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, np.nan]]))
    with pytest.raises(ValueError, match="non-finite"):
        BinTokenizer().fit([np.array([[np.inf]])])
    with pytest.raises(ValueError, match=r"ids span \[0, 32\], outside \[0, 32\)"):
        tok.decode(torch.tensor([[0], [32], [1]]))
    with pytest.raises(ValueError, match=r"ids span \[-1"):
        tok.decode_array(np.array([[-1, 0, 0]]))
    with pytest.raises(ValueError, match="integer ids"):
        tok.decode_array(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="D=3"):
        tok.decode(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="disagree on D"):
        BinTokenizer().fit([np.zeros((2, 3)), np.zeros((2, 4))])


@pytest.mark.parametrize("tok", [BinTokenizer(), BinTokenizer(low=-1.0, high=1.0),
                                 BinTokenizer(scheme="quantile")])
def test_unfitted_raises(tok):
    with pytest.raises(ValueError, match=r"call fit"):
        tok.encode(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"call fit"):
        tok.decode(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"call fit"):
        tok.bin_edges


@pytest.mark.parametrize("kwargs, match", [
    ({"n_bins": 1}, "n_bins must be an int >= 2, got 1"),
    ({"n_bins": 8.0}, "n_bins"),
    ({"scheme": "log"}, r"scheme='log'; allowed: \('uniform', 'quantile', 'mulaw'\)"),
    ({"decode_with": "median"}, "decode_with='median'"),
    ({"out_of_range": "wrap"}, "out_of_range='wrap'"),
    ({"mu": 0.0}, "mu must be"),
    ({"modality": ""}, "modality"),
    ({"low": 1.0, "high": 1.0}, "low < high"),
    ({"low": [0.0, 2.0], "high": [1.0, 1.0]}, "low < high"),
    ({"low": [0.0], "high": [1.0, 2.0]}, "one per dimension"),
    ({"low": 0.0}, "both low and high"),
    ({"low": float("nan"), "high": 1.0}, "finite"),
    ({"scheme": "quantile", "low": 0.0, "high": 1.0}, "quantile"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BinTokenizer(**kwargs)


def test_discrete_errors():
    for n in (0, 2.0, True):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            DiscreteTokenizer(n)
    tok = DiscreteTokenizer(4)
    with pytest.raises(ValueError, match=r"action 4 is outside \[0, 4\)"):
        tok.encode(np.array([0, 4]))
    with pytest.raises(ValueError, match=r"action -1 is outside \[0, 4\)"):
        tok.encode_array(np.array([[-1]]))
    with pytest.raises(ValueError, match=r"integers in \[0, 4\), got 1\.5"):
        tok.encode(np.array([1.5]))
    assert tok.encode(np.array([1.0, 3.0])).tolist() == [[1, 3]]  # whole floats are fine
    with pytest.raises(ValueError, match="dtype bool"):
        tok.encode(np.array([True]))
    with pytest.raises(ValueError, match=r"expected ids \(1, T\)"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        tok.decode(torch.tensor([[7]]))
    with pytest.raises(ValueError, match="sample 1"):
        tok.fit([np.array([1]), np.array([9])])


# ---------------------------------------------------------------- config


def test_config_round_trip_quantile_state():
    tok = _fitted("quantile", n_bins=64, decode_with="mean")
    cfg = json.loads(json.dumps(tok.config()))
    assert cfg["target"] == "armodal.tokenizers.action.BinTokenizer"
    rebuilt = tokenizer_from_config(cfg)
    assert np.array_equal(rebuilt.bin_edges, tok.bin_edges)  # exact through JSON
    x = _data(9, 300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # new data may fall just outside the fitted range
        assert torch.equal(rebuilt.encode(x), tok.encode(x))
    ids = tok.encode_array(_data(0, 50))
    assert np.array_equal(rebuilt.decode_array(ids), tok.decode_array(ids))
    with pytest.raises(ValueError, match="non-decreasing"):
        BinTokenizer(n_bins=64).load_state_dict({"edges": [[1.0, 0.0]]})
