"""The ``val`` split: a deterministic, class-stratified share of the training split, held out
while the shards are written, so that choices (the online monitor, a search's ranking, a probe's
epoch) never read the test split and training never sees a ``val`` image.

Selection is streaming and depends only on each sample's class and its rank within its class in
the source's order (plus the seed), never on timing or the machine: with a fraction ``f`` the
``k``-th image of class ``c`` is held out when ``floor((k + 1) f + phase_c)`` exceeds
``floor(k f + phase_c)`` (systematic sampling: every ``1/f``-th image of each class, so each class
gives ``floor`` or ``ceil`` of ``n_c f``); with ``per_class = N`` the first ``N`` images of each
class are held out.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_VAL_FRACTION = 0.1
VAL_SPLIT = "val"


@dataclass
class Holdout:
    """Decides, one training sample at a time, whether it goes to ``val``."""

    fraction: float = DEFAULT_VAL_FRACTION
    per_class: Optional[int] = None
    seed: int = 0
    _seen: dict[int, int] = field(default_factory=dict)
    _keys: list[str] = field(default_factory=list)

    def _phase(self, label: int) -> float:
        digest = hashlib.blake2b(f"val/{self.seed}/{label}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2 ** 64

    def take(self, key: str, label: int) -> bool:
        """True when this sample belongs to ``val`` (each call advances its class's count)."""
        k = self._seen.get(label, 0)
        self._seen[label] = k + 1
        if self.per_class is not None:
            held = k < self.per_class
        else:
            phase = self._phase(label)
            held = math.floor((k + 1) * self.fraction + phase) > math.floor(k * self.fraction + phase)
        if held:
            self._keys.append(key)
        return held

    def record(self) -> dict:
        """What the manifest keeps of the split: the rule and a digest of the held-out keys."""
        rule = ({"per_class": self.per_class} if self.per_class is not None
                else {"fraction": self.fraction})
        digest = hashlib.sha256("\n".join(sorted(self._keys)).encode()).hexdigest()
        return {"from": "train", **rule, "seed": self.seed, "num_samples": len(self._keys),
                "keys_sha256": digest}
