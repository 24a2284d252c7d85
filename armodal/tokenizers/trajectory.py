"""TrajectoryTokenizer: an episode of a control task as one token stream, Decision-Transformer
style. Every timestep is a fixed group of G tokens:

    [return-to-go] [observation dim 0 .. D_obs-1] [action dim 0 .. D_act-1]

The return-to-go token is optional (returns=None). Each part is a per-dimension tokenizer
(armodal.tokenizers.action: BinTokenizer for continuous values, DiscreteTokenizer for discrete
actions) and its D dimensions are laid out by the flatten stream pattern, so dimension k has its
own id range [k * n_bins, (k + 1) * n_bins) and the model always knows which dimension comes next.

The TokenSpace has one modality per part ("return", "observation", "action"), in that order and
without markers; the fixed group needs none. Local ids of the whole trajectory are the space's
global ids less the shared specials, so `encode` / `decode` honour the Tokenizer contract while
the control loop works in global ids directly (`observation_ids`, `action_ids`, ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from armodal.data.episodes import Episode
from armodal.tokenizers.base import tokenizer_from_config
from armodal.tokenizers.patterns import stream_pattern
from armodal.tokenizers.space import TokenSpace

__all__ = ["TrajectoryTokenizer", "PARTS"]

PARTS = ("return", "observation", "action")  # the order of a timestep's tokens


class TrajectoryTokenizer:
    """Episodes -> (T * G,) local ids and back; fitted on training episodes.

    observation / action / returns: per-dimension tokenizers (or their `config()` dicts, as a
    run directory stores them) whose modality is "observation", "action" and "return"."""

    modality = "action"  # what an action run is, for the CLI; its space has three modalities
    unit = "action"  # bits are reported per action token
    lossless = False

    def __init__(self, observation: Any, action: Any, returns: Any | None = None) -> None:
        parts = {"return": returns, "observation": observation, "action": action}
        self.parts = {}
        for name, tok in parts.items():
            if tok is None:
                continue
            tok = tokenizer_from_config(tok) if isinstance(tok, dict) else tok
            if tok.modality != name:
                raise ValueError(f"the {name} tokenizer has modality {tok.modality!r}; set "
                                 f"modality: {name} on it")
            self.parts[name] = tok
        self._layout: dict | None = None  # space and per-dimension offsets, once fitted
        if "return" in self.parts and self.parts["return"].dim not in (None, 1):
            raise ValueError(f"the return-to-go tokenizer must be 1-D, got dim "
                             f"{self.parts['return'].dim}")

    # --- fitting and the layout -------------------------------------------------------------

    @property
    def has_returns(self) -> bool:
        return "return" in self.parts

    @property
    def is_fitted(self) -> bool:
        return all(tok.is_fitted and tok.dim is not None for tok in self.parts.values())

    def fit(self, episodes: list[Episode]) -> None:
        """Fit every part on the training episodes (observations, actions, returns-to-go)."""
        self.parts["observation"].fit([ep.observations for ep in episodes])
        self.parts["action"].fit([ep.actions for ep in episodes])
        if self.has_returns:
            self.parts["return"].fit([ep.returns_to_go()[:, None] for ep in episodes])
        self._layout = None

    def _fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError("TrajectoryTokenizer is not fitted; call fit(episodes) first (an "
                             "ActionDataModule does, on its training episodes)")

    def dims(self) -> dict[str, int]:
        """Tokens per timestep of each part, in timestep order."""
        self._fitted()
        return {name: tok.dim for name, tok in self.parts.items()}

    @property
    def group(self) -> int:
        """G: tokens per timestep."""
        return sum(self.dims().values())

    @property
    def space(self) -> TokenSpace:
        """One modality per part, each D * n_bins ids (the flatten pattern's vocabulary)."""
        return self._fixed_layout()["space"]

    def _fixed_layout(self) -> dict:
        if self._layout is None:
            space = TokenSpace({name: self._pattern(name).vocab_size for name in self.dims()})
            # Global id of bin 0 of each dimension: the flatten pattern laying out one frame of
            # zero codes, shifted to the part's offset.
            offsets = {}
            for name in self.parts:
                zeros = torch.zeros(self.parts[name].dim, 1, dtype=torch.long)
                laid = self._pattern(name).apply(zeros, fill=-1)[0]  # (D,)
                offsets[name] = (laid + space.offset(name)).numpy()
            self._layout = {"space": space, "offsets": offsets,
                            "base": space.offset(next(iter(self.parts)))}
        return self._layout

    def _pattern(self, name: str):
        tok = self.parts[name]
        return stream_pattern("flatten", tok.dim, tok.vocab_size)

    def slot_parts(self) -> list[str]:
        """(G,) the part each token of a timestep belongs to."""
        return [name for name, d in self.dims().items() for _ in range(d)]

    @property
    def vocab_size(self) -> int:
        return self.space.vocab_size - self._fixed_layout()["base"]

    # --- the control loop's fast path: global ids, arrays in and out -------------------------

    def part_ids(self, name: str, values: np.ndarray) -> np.ndarray:
        """values (N, D) (or (N,) discrete actions / returns) -> (N, D) int64 global ids."""
        values = np.asarray(values)
        if name == "return" and values.ndim == 1:
            values = values[:, None]
        bins = self.parts[name].encode_array(values)  # (N, D) local bins
        return bins + self._fixed_layout()["offsets"][name]

    def actions_from_ids(self, ids: np.ndarray) -> np.ndarray:
        """(N, D_act) global action ids -> env actions: (N,) int64 or (N, D_act) float32."""
        return self.parts["action"].decode_array(ids - self._fixed_layout()["offsets"]["action"])

    def action_masks(self) -> Tensor:
        """Bool (D_act, V): the global ids action dimension k may take."""
        size = self.parts["action"].vocab_size
        ids = torch.arange(self.space.vocab_size)
        return torch.stack([(ids >= lo) & (ids < lo + size)
                            for lo in self._fixed_layout()["offsets"]["action"].tolist()])

    def episode_ids(self, episode: Episode) -> np.ndarray:
        """(T, G) int64 global ids of an episode, one row per timestep."""
        columns = {"observation": episode.observations, "action": episode.actions,
                   "return": episode.returns_to_go()}
        return np.concatenate([self.part_ids(name, columns[name]) for name in self.dims()],
                              axis=1)

    # --- the Tokenizer contract -------------------------------------------------------------

    def encode(self, episode: Episode) -> Tensor:
        """(T * G,) int64 local ids, timestep after timestep."""
        self._fitted()
        ids = self.episode_ids(episode) - self._fixed_layout()["base"]
        return torch.from_numpy(ids.reshape(-1))

    def decode(self, ids: Tensor) -> dict[str, np.ndarray]:
        """(T * G,) local ids -> {"observations": (T, D_obs), "actions": ..., "returns_to_go":
        (T,) when present}: bin values, so within half a bin of what was encoded."""
        self._fitted()
        layout, dims = self._fixed_layout(), self.dims()
        ids = np.asarray(torch.as_tensor(ids), dtype=np.int64)
        if ids.ndim != 1 or len(ids) % self.group:
            raise ValueError(f"expected (T * G,) ids with G={self.group} per timestep, got "
                             f"shape {ids.shape}")
        steps = ids.reshape(-1, self.group) + layout["base"]
        out, start = {}, 0
        names = {"return": "returns_to_go", "observation": "observations", "action": "actions"}
        for name, d in dims.items():
            block = steps[:, start:start + d] - layout["offsets"][name]
            start += d
            values = self.parts[name].decode_array(block)
            out[names[name]] = values[:, 0] if name == "return" else values
        return out

    def count_units(self, episode: Episode) -> int:
        return episode.length * self.dims()["action"]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def config(self) -> dict:
        target = f"{type(self).__module__}.{type(self).__qualname__}"
        init = {("returns" if name == "return" else name): tok.config()
                for name, tok in self.parts.items()}
        return {"target": target, "init": init, "state": {}}
