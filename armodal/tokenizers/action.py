"""Control tokenizers: continuous vectors binned per dimension, discrete actions passed through.

BinTokenizer: a vector of D continuous values (an action, an observation, a return-to-go with
    D = 1) becomes D tokens, one per dimension, each a bin index in [0, n_bins):
    (T, D) -> (D, T). A stream pattern (armodal/tokenizers/patterns.py) lays the D streams out.
    Three ways to place the bins:
      uniform   equal-width bins over [low, high] (given, or the data's min / max per dimension);
      quantile  bins holding equal shares of the fitted data (fine where data is dense);
      mulaw     Gato's mu-law companding: fine bins near 0, coarse ones at the extremes.
DiscreteTokenizer: actions 0..n-1 are already tokens: (T,) -> (1, T), lossless.

Both expose numpy fast paths (`encode_array`, `decode_array`) for the control loop, which
tokenizes one step at a time and should not pay for torch round trips.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

__all__ = ["BIN_SCHEMES", "DECODE_WITH", "OUT_OF_RANGE", "BinTokenizer", "DiscreteTokenizer"]

BIN_SCHEMES = ("uniform", "quantile", "mulaw")
DECODE_WITH = ("centre", "mean")
OUT_OF_RANGE = ("clamp", "error")

# Half-width given to a constant dimension so its uniform edges stay strictly increasing.
_MIN_HALF_WIDTH = 1e-6
# Values (and low / high) must fit float32 with room for bin arithmetic (high - low).
_MAX_MAGNITUDE = 1e37


def _target(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _as_numpy(x: Any, who: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{who}: expected numbers, got dtype {x.dtype}")
    return x


def _bound(value: Any, name: str) -> float | list[float] | None:
    """A low/high argument as a float or a list of floats (JSON-ready), or None."""
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim > 1 or arr.size == 0 or not np.isfinite(arr).all() \
            or np.abs(arr).max() > _MAX_MAGNITUDE:
        raise ValueError(f"BinTokenizer: {name} must be a finite number or a non-empty list of "
                         f"finite numbers (one per dimension) within +-{_MAX_MAGNITUDE:g}, got "
                         f"{value!r}")
    return float(arr) if arr.ndim == 0 else [float(v) for v in arr]


class BinTokenizer:
    """Continuous vectors (T, D) -> local ids (D, T), one token per dimension, n_bins per dim.

    Lossy: "centre" decoding returns the bin's midpoint (within half a bin of an in-range input);
    "mean" returns the mean of the training values that fell in the bin (the midpoint for bins
    no training value fell in, or when the edges came from per-dimension low/high without fit).

    Args:
        modality: "action", "observation", "return", ...
        n_bins: bins per dimension; the local vocabulary is [0, n_bins) for every dimension.
        scheme: one of BIN_SCHEMES.
        low, high: value range, a scalar (D then comes from `fit`) or one value per dimension
            (then `fit` is optional). uniform bins span [low, high]; mulaw uses
            scale = max(|low|, |high|) and spans [-scale, scale]; quantile takes no range.
        mu: mulaw companding strength (larger: finer bins near 0).
        decode_with: one of DECODE_WITH.
        out_of_range: values outside the edges are clamped into the outer bin with a warning
            ("clamp") or rejected ("error").
    """

    unit = "dim"
    lossless = False

    def __init__(self, modality: str = "action", n_bins: int = 256, scheme: str = "uniform",
                 low: float | list[float] | None = None, high: float | list[float] | None = None,
                 mu: float = 100.0, decode_with: str = "centre",
                 out_of_range: str = "clamp") -> None:
        if not isinstance(modality, str) or not modality:
            raise ValueError(f"BinTokenizer: modality must be a non-empty str, got {modality!r}")
        if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 2:
            raise ValueError(f"BinTokenizer: n_bins must be an int >= 2, got {n_bins!r}")
        if scheme not in BIN_SCHEMES:
            raise ValueError(f"BinTokenizer: scheme={scheme!r}; allowed: {BIN_SCHEMES}")
        if decode_with not in DECODE_WITH:
            raise ValueError(f"BinTokenizer: decode_with={decode_with!r}; allowed: {DECODE_WITH}")
        if out_of_range not in OUT_OF_RANGE:
            raise ValueError(f"BinTokenizer: out_of_range={out_of_range!r}; allowed: "
                             f"{OUT_OF_RANGE}")
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 < mu < float("inf"):
            raise ValueError(f"BinTokenizer: mu must be a finite number > 0, got {mu!r}")
        low, high = _bound(low, "low"), _bound(high, "high")
        if (low is None) != (high is None):
            raise ValueError(f"BinTokenizer: give both low and high or neither, got low={low!r}, "
                             f"high={high!r}")
        if low is not None and scheme == "quantile":
            raise ValueError("BinTokenizer: scheme='quantile' places its edges from the data; "
                             "low/high apply to 'uniform' and 'mulaw' only")
        if isinstance(low, list) and isinstance(high, list) and len(low) != len(high):
            raise ValueError(f"BinTokenizer: low has {len(low)} values, high has {len(high)}; "
                             "give one per dimension for both")
        if low is not None and not np.all(np.asarray(low) < np.asarray(high)):
            raise ValueError(f"BinTokenizer: need low < high in every dimension, got "
                             f"low={low!r}, high={high!r}")
        self.modality, self.n_bins, self.scheme = modality, n_bins, scheme
        self.low, self.high, self.mu = low, high, float(mu)
        self.decode_with, self.out_of_range = decode_with, out_of_range
        self.vocab_size = n_bins
        self._who = f"BinTokenizer({modality!r})"
        self._edges: np.ndarray | None = None  # (D, n_bins + 1)
        self._means: np.ndarray | None = None  # (D, n_bins), set by fit / load_state_dict
        # Per-dimension bounds fix the edges without data, so the tokenizer is usable unfitted.
        if isinstance(low, list) or isinstance(high, list):
            d = len(low) if isinstance(low, list) else len(high)
            self._set_edges(self._range_edges(d))

    # ------------------------------------------------------------------ state

    @property
    def is_fitted(self) -> bool:
        """Whether the bin edges are known (by fit, load_state_dict or per-dim low/high)."""
        return self._edges is not None

    @property
    def dim(self) -> int | None:
        """D, the number of dimensions; None until fitted."""
        return None if self._edges is None else self._edges.shape[0]

    @property
    def bin_edges(self) -> np.ndarray:
        """(D, n_bins + 1) float64 edges in value space, non-decreasing per dimension."""
        return self._require_edges("bin_edges").copy()

    def fit(self, samples: Iterable[Any]) -> None:
        """Place the bins from `samples`, arrays (T, D) or (D,), and learn the per-bin means."""
        # A refit may change D, unless per-dimension low/high fixed it.
        d_fixed = len(self.low) if isinstance(self.low, list) else None
        rows = [self._as_rows(s, f"{self._who}.fit (sample {i})", d_fixed)
                for i, s in enumerate(samples)]
        if not rows:
            raise ValueError(f"{self._who}.fit: got no samples")
        dims = {r.shape[1] for r in rows}
        if len(dims) > 1:
            raise ValueError(f"{self._who}.fit: samples disagree on D: {sorted(dims)}")
        x = np.concatenate(rows)  # (N, D)
        if x.shape[0] == 0:
            raise ValueError(f"{self._who}.fit: the samples hold no values")
        _check_finite(x, f"{self._who}.fit")
        if np.abs(x).max() > _MAX_MAGNITUDE:
            raise ValueError(f"{self._who}.fit: values reach {float(np.abs(x).max())!r}; bins "
                             f"decode to float32, so |x| must stay within {_MAX_MAGNITUDE:g}")
        d = x.shape[1]
        if self.low is not None:
            edges = self._range_edges(d)
        elif self.scheme == "uniform":
            lo, hi = x.min(0), x.max(0)
            flat = lo == hi
            pad = _MIN_HALF_WIDTH * np.maximum(1.0, np.abs(lo))
            edges = _linspace(np.where(flat, lo - pad, lo), np.where(flat, hi + pad, hi),
                              self.n_bins)
        elif self.scheme == "quantile":
            edges = np.quantile(x, np.linspace(0.0, 1.0, self.n_bins + 1), axis=0).T
            # Interpolation rounding must never make edges decrease (ties give equal edges).
            edges = np.maximum.accumulate(edges, axis=1)
        else:
            edges = self._mulaw_edges(np.abs(x).max(0))
        ids = self._bin(x, edges, f"{self._who}.fit")  # before any state changes: may raise
        self._set_edges(edges)
        # Clamped values count as the outer bin's edge, so a bin's mean stays inside the bin.
        x = np.clip(x, edges[:, 0], edges[:, -1])
        flat_ids = (ids + np.arange(d) * self.n_bins).ravel()
        size = d * self.n_bins
        counts = np.bincount(flat_ids, minlength=size).reshape(d, self.n_bins)
        sums = np.bincount(flat_ids, weights=x.ravel(), minlength=size).reshape(d, self.n_bins)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), self._centres)
        self._means = np.clip(means, edges[:, :-1], edges[:, 1:])

    def state_dict(self) -> dict:
        """The fitted edges and per-bin means as JSON-ready lists ({} when unfitted)."""
        if self._edges is None:
            return {}
        means = None if self._means is None else self._means.tolist()
        return {"edges": self._edges.tolist(), "means": means}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state returned by `state_dict`."""
        edges = np.asarray(state.get("edges"), dtype=np.float64)
        if edges.ndim != 2 or edges.shape[1] != self.n_bins + 1 or not np.isfinite(edges).all() \
                or (np.diff(edges, axis=1) < 0).any():
            raise ValueError(f"{self._who}.load_state_dict: edges must be finite, non-decreasing "
                             f"(D, {self.n_bins + 1}), got shape {edges.shape}")
        means = state.get("means")
        if means is not None:
            means = np.asarray(means, dtype=np.float64)
            if means.shape != (edges.shape[0], self.n_bins):
                raise ValueError(f"{self._who}.load_state_dict: means must be "
                                 f"{(edges.shape[0], self.n_bins)}, got {means.shape}")
        self._set_edges(edges)
        self._means = means

    def config(self) -> dict:
        init = {"modality": self.modality, "n_bins": self.n_bins, "scheme": self.scheme,
                "low": self.low, "high": self.high, "mu": self.mu,
                "decode_with": self.decode_with, "out_of_range": self.out_of_range}
        return {"target": _target(self), "init": init, "state": self.state_dict()}

    # ------------------------------------------------------------- encode / decode

    def encode(self, sample: Any) -> Tensor:
        """(T, D) or (D,) array/tensor -> (D, T) int64 ids; a (D,) vector gives (D, 1)."""
        x = self._as_rows(sample, f"{self._who}.encode")
        ids = self._bin(x, self._require_edges(f"{self._who}.encode"), f"{self._who}.encode")
        return torch.from_numpy(ids.T.copy())

    def encode_array(self, x: np.ndarray) -> np.ndarray:
        """Fast path without torch: (N, D) floats -> (N, D) int64 ids."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"{self._who}.encode_array: expected (N, {self.dim}), got "
                             f"{x.shape}")
        who = f"{self._who}.encode_array"
        return self._bin(x, self._require_edges(who), who)

    def decode(self, ids: Any) -> np.ndarray:
        """(D, T) ids (tensor or array) -> (T, D) float32 values."""
        ids = _as_numpy(ids, f"{self._who}.decode")
        if ids.ndim != 2:
            raise ValueError(f"{self._who}.decode: expected ids (D, T), got shape {ids.shape}")
        return self.decode_array(ids.T)

    def decode_array(self, ids: np.ndarray) -> np.ndarray:
        """Fast path without torch: (N, D) int ids -> (N, D) float32 values."""
        who = f"{self._who}.decode"
        edges = self._require_edges(who)
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{who}: expected integer ids, got dtype {ids.dtype}")
        if ids.ndim != 2 or ids.shape[1] != edges.shape[0]:
            raise ValueError(f"{who}: expected ids for D={edges.shape[0]} dimensions "
                             f"((D, T) for decode, (N, D) for decode_array), got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_bins):
            raise ValueError(f"{who}: ids span [{ids.min()}, {ids.max()}], outside "
                             f"[0, {self.n_bins})")
        table = self._means if self.decode_with == "mean" and self._means is not None \
            else self._centres  # (D, n_bins)
        return table[np.arange(edges.shape[0]), ids].astype(np.float32)

    def count_units(self, sample: Any) -> int:
        """T * D values in the sample."""
        return int(_as_numpy(sample, f"{self._who}.count_units").size)

    # ------------------------------------------------------------------ internals

    def _require_edges(self, who: str) -> np.ndarray:
        if self._edges is None:
            raise ValueError(f"{who}: the tokenizer is not fitted; call fit(samples) first "
                             "(or give per-dimension low/high lists)")
        return self._edges

    def _set_edges(self, edges: np.ndarray) -> None:
        self._edges = np.ascontiguousarray(edges, dtype=np.float64)
        self._centres = 0.5 * (self._edges[:, :-1] + self._edges[:, 1:])  # (D, n_bins)
        self._means = None

    def _range_edges(self, d: int) -> np.ndarray:
        """(d, n_bins + 1) edges from the given low/high."""
        low = np.broadcast_to(np.asarray(self.low, dtype=np.float64), (d,))
        high = np.broadcast_to(np.asarray(self.high, dtype=np.float64), (d,))
        if self.scheme == "mulaw":
            return self._mulaw_edges(np.maximum(np.abs(low), np.abs(high)))
        return _linspace(low, high, self.n_bins)

    def _mulaw_edges(self, scale: np.ndarray) -> np.ndarray:
        """Uniform bins over companded c in [-1, 1], mapped back to value space."""
        scale = np.maximum(scale, _MIN_HALF_WIDTH)  # an all-zero dimension still gets a range
        c = np.linspace(-1.0, 1.0, self.n_bins + 1)
        y = np.sign(c) * np.expm1(np.abs(c) * np.log1p(self.mu)) / self.mu
        edges = scale[:, None] * y[None, :]
        # expm1/log1p rounding must not leave the data's extremes just outside the range.
        edges[:, 0], edges[:, -1] = -scale, scale
        return edges

    def _as_rows(self, sample: Any, who: str, d: int | None = -1) -> np.ndarray:
        """A (T, D) or (D,) sample as float64 rows (T, D); D must be `d` (default: self.dim)."""
        x = _as_numpy(sample, who).astype(np.float64, copy=False)
        d = self.dim if d == -1 else d
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or (d is not None and x.shape[1] != d):
            want = "(T, D) or (D,)" if d is None else f"(T, {d}) or ({d},)"
            raise ValueError(f"{who}: expected shape {want}, got {tuple(np.shape(sample))}"
                             + ("; a sequence of scalars is (T, 1)" if d == 1 else ""))
        return x

    def _bin(self, x: np.ndarray, edges: np.ndarray, who: str) -> np.ndarray:
        """(N, D) float64 -> (N, D) int64 bin ids under `edges`, applying out_of_range."""
        d = edges.shape[0]
        if x.shape[1] != d:
            raise ValueError(f"{who}: expected shape (N, {d}), got {x.shape}")
        _check_finite(x, who)
        lo, hi = edges[:, 0], edges[:, -1]
        excess = np.maximum(lo - x, x - hi)  # > 0 exactly where a value is out of range
        if (excess > 0).any():
            self._out_of_range(x, excess, edges, who)
        ids = np.empty(x.shape, dtype=np.int64)
        for k in range(d):  # D is small; searchsorted is vectorised over N
            ids[:, k] = np.searchsorted(edges[k, 1:-1], x[:, k], side="right")
        # Values at or above the top edge land past the last bin: clamp them into it.
        return np.clip(ids, 0, self.n_bins - 1, out=ids)

    def _out_of_range(self, x: np.ndarray, excess: np.ndarray, edges: np.ndarray,
                      who: str) -> None:
        row, col = np.unravel_index(np.argmax(excess), excess.shape)
        lo, hi = float(edges[col, 0]), float(edges[col, -1])
        n = int((excess > 0).sum())
        facts = (f"{n} value(s) outside the range of modality {self.modality!r}; worst "
                 f"{float(x[row, col])!r} in dimension {col}, allowed [{lo!r}, {hi!r}]")
        if self.out_of_range == "error":
            raise ValueError(f"{who}: {facts} (out_of_range='error')")
        warnings.warn(f"{who}: {facts}; clamped into the outer bin", stacklevel=4)


def _check_finite(x: np.ndarray, who: str) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ValueError(f"{who}: non-finite value {float(x[row, col])} at row {row}, "
                         f"dimension {col}")


def _linspace(low: np.ndarray, high: np.ndarray, n_bins: int) -> np.ndarray:
    """(D,), (D,) -> (D, n_bins + 1) evenly spaced edges with the exact endpoints."""
    edges = low[:, None] + (high - low)[:, None] * np.linspace(0.0, 1.0, n_bins + 1)[None, :]
    edges[:, 0], edges[:, -1] = low, high
    return edges


class DiscreteTokenizer:
    """Discrete actions 0..n-1 passed through: (T,) ints -> (1, T) int64 ids; lossless.

    `decode` returns a numpy int64 array (T,), so decode(encode(x)) == x for samples given as
    numpy int arrays (T,) (the type `check_tokenizer` should be run with). Float inputs are
    accepted when every value is a whole number.
    """

    unit = "action"
    lossless = True
    dim = 1
    is_fitted = True

    def __init__(self, n: int, modality: str = "action") -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"DiscreteTokenizer: n must be an int >= 1, got {n!r}")
        if not isinstance(modality, str) or not modality:
            raise ValueError(f"DiscreteTokenizer: modality must be a non-empty str, got "
                             f"{modality!r}")
        self.n, self.modality, self.vocab_size = n, modality, n
        self._who = f"DiscreteTokenizer({modality!r})"

    def fit(self, samples: Iterable[Any]) -> None:
        """Nothing to learn; checks that every sample is a valid action sequence."""
        for i, s in enumerate(samples):
            self._check(_as_numpy(s, f"{self._who}.fit"), f"{self._who}.fit (sample {i})")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self._who}.load_state_dict: expected an empty state, got keys "
                             f"{sorted(state)}")

    def config(self) -> dict:
        return {"target": _target(self), "init": {"n": self.n, "modality": self.modality},
                "state": {}}

    def encode(self, sample: Any) -> Tensor:
        """(T,) ints or a scalar -> (1, T) int64 ids."""
        x = _as_numpy(sample, f"{self._who}.encode")
        if x.ndim > 1:
            raise ValueError(f"{self._who}.encode: expected (T,) or a scalar, got {x.shape}")
        return torch.from_numpy(self._check(x.reshape(1, -1), f"{self._who}.encode"))

    def encode_array(self, x: np.ndarray) -> np.ndarray:
        """Fast path without torch: (N,) or (N, 1) ints -> (N, 1) int64 ids."""
        x = np.asarray(x)
        if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[1] != 1):
            raise ValueError(f"{self._who}.encode_array: expected (N,) or (N, 1), got {x.shape}")
        return self._check(x.reshape(-1, 1), f"{self._who}.encode_array")

    def decode(self, ids: Any) -> np.ndarray:
        """(1, T) ids (tensor or array) -> (T,) int64 actions."""
        ids = _as_numpy(ids, f"{self._who}.decode")
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"{self._who}.decode: expected ids (1, T), got {ids.shape}")
        return self.decode_array(ids.T)

    def decode_array(self, ids: np.ndarray) -> np.ndarray:
        """Fast path without torch: (N, 1) ids -> (N,) int64 actions."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"{self._who}.decode: expected integer ids (N, 1), got "
                             f"{ids.dtype} {ids.shape}")
        return self._check(ids, f"{self._who}.decode")[:, 0]

    def count_units(self, sample: Any) -> int:
        """T actions in the sample (1 for a scalar)."""
        return int(_as_numpy(sample, f"{self._who}.count_units").size)

    def _check(self, x: np.ndarray, who: str) -> np.ndarray:
        """Any-shape numbers -> the same shape as int64, or ValueError naming the bad value."""
        if x.dtype.kind == "f":
            bad = ~np.isfinite(x) | (x != np.round(x))
            if bad.any():
                raise ValueError(f"{who}: actions must be integers in [0, {self.n}), got "
                                 f"{x[bad].flat[0].item()!r}")
        elif x.dtype.kind not in "iu":
            raise ValueError(f"{who}: actions must be integers in [0, {self.n}), got dtype "
                             f"{x.dtype}")
        if x.size and (x.min() < 0 or x.max() >= self.n):
            worst = (x.min() if x.min() < 0 else x.max()).item()
            raise ValueError(f"{who}: action {worst!r} is outside [0, {self.n})")
        return x.astype(np.int64)
