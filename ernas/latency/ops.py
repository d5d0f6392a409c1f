"""Op keys for the latency code: the vocabulary of ``ernas.keys``, and ``build_op``, which first
registers every findable family's op builders when a key names an op not registered yet."""
from __future__ import annotations

from ernas.keys import OpKey, known_ops, op_key, parse_key, register_ops

__all__ = ["OpKey", "build_op", "known_ops", "op_key", "parse_key", "register_ops"]


def build_op(key: str, seed: int = 0):
    """Module and example input for one op key (random but seeded weights, eval mode)."""
    from ernas.family import all_families
    from ernas.keys import build_registered

    if parse_key(key).op not in known_ops():
        all_families()  # registers every findable family's builders
    return build_registered(key, seed)
