"""Norm positions and the schedules that resolve into one position per layer.

A schedule is resolved once, when the config is built; from then on each block
only knows its own position (docs/paper.md#norm-positions-per-layer has the formulas and sources).
"""
from __future__ import annotations

import math

POSITIONS = ("pre", "post", "peri", "lns", "deepnorm", "deeppost", "siamese", "residual-dual")
# The norm zoo (see docs/norm-zoo.md): reordered = OLMo 2's norm of each sublayer output before its add;
# hybrid = HybridNorm (q/k/v norms, FFN Post-Norm); hybrid-first = HybridNorm*'s first block.
ZOO_POSITIONS = ("reordered", "hybrid", "hybrid-first")
POSITIONS = POSITIONS + ZOO_POSITIONS
QKV_NORM_POSITIONS = ("hybrid", "hybrid-first")  # positions whose attention norms q, k and v per head
SCHEDULES = ("mix", "hybridnorm-star")  # plus any explicit list: "post,post,pre" or "post*3,pre*9"
ALIASES = {"sandwich": "peri", "post_pre": "mix", "mixln": "mix", "mix-ln": "mix",
           "siamesenorm": "siamese", "residual_dual": "residual-dual", "resi-dual": "residual-dual",
           "olmo2": "reordered", "hybridnorm": "hybrid", "hybridnorm*": "hybridnorm-star"}
# Positions whose layers carry a second residual stream from the embedding to the LM head (see
# model/two_stream.py): a model has it in every layer or in none.
TWO_STREAM = ("siamese", "residual-dual")


def mix_post_layers(num_layers: int, post_ln_layers: int | None, post_ln_fraction: float) -> int:
    """k, the number of leading Post-LN layers of a Mix-LN model: given, or floor(alpha * L)."""
    if post_ln_layers is not None:
        if not 0 <= post_ln_layers <= num_layers:
            raise ValueError(
                f"post_ln_layers: must be between 0 and num_layers={num_layers}, got {post_ln_layers}"
            )
        return post_ln_layers
    if not 0.0 <= post_ln_fraction <= 1.0:
        raise ValueError(f"post_ln_fraction: must be in [0, 1], got {post_ln_fraction}")
    return math.floor(post_ln_fraction * num_layers + 1e-9)


def parse_position_list(spec: str) -> list[str]:
    """'post*3,pre*9' or 'post,post,pre' -> ['post', 'post', 'post', 'pre', ...]."""
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise ValueError(f"norm_position: empty entry in list {spec!r}")
        name, _, count = item.partition("*")
        name = ALIASES.get(name.strip(), name.strip())
        if name not in POSITIONS:
            raise ValueError(f"norm_position: unknown position {name!r} in {spec!r}; allowed: {', '.join(POSITIONS)}")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ValueError(f"norm_position: repeat count in {item!r} must be an integer") from None
        if n < 1:
            raise ValueError(f"norm_position: repeat count in {item!r} must be >= 1")
        out.extend([name] * n)
    return out


def resolve_positions(
    spec: str, num_layers: int, post_ln_layers: int | None = None, post_ln_fraction: float = 0.25
) -> tuple[str, ...]:
    """Turn a position name, schedule or explicit list into one position per layer."""
    name = ALIASES.get(spec.strip(), spec.strip())
    if name == "mix":
        k = mix_post_layers(num_layers, post_ln_layers, post_ln_fraction)
        return ("post",) * k + ("pre",) * (num_layers - k)
    if name == "hybridnorm-star":  # HybridNorm*: block 1 = hybrid-first, then HybridNorm blocks
        return ("hybrid-first",) + ("hybrid",) * (num_layers - 1)
    if post_ln_layers is not None:
        raise ValueError(f"post_ln_layers: only applies to norm_position='mix', not {spec!r}")
    if "," in name or "*" in name:
        positions = parse_position_list(name)
        if len(positions) != num_layers:
            raise ValueError(
                f"norm_position: the explicit list has {len(positions)} entries but num_layers={num_layers}"
            )
        check_streams(positions, spec)
        return tuple(positions)
    if name in POSITIONS:
        return (name,) * num_layers
    raise ValueError(
        f"norm_position: unknown value {spec!r}; allowed: {', '.join(POSITIONS + SCHEDULES)} "
        "or a per-layer list such as 'post*3,pre*9'"
    )


def check_streams(positions, spec: str) -> None:
    """A two-stream position (siamese, residual-dual) keeps its second stream from the embedding to the
    LM head, whose final norms combine both streams: a list must use one of them in every layer."""
    kinds = {p for p in positions if p in TWO_STREAM}
    if kinds and (len(kinds) > 1 or len(set(positions)) > 1):
        raise ValueError(
            f"--norm-position: {spec!r} mixes {'/'.join(sorted(kinds))} with other positions; a two-stream "
            "position carries its second residual stream from the embedding to the final norms, so it must "
            "be the position of every layer (e.g. --norm-position siamese)")


def format_positions(positions) -> str:
    """Compact run-length form, the inverse of parse_position_list: ('post','post','pre') -> 'post*2,pre'."""
    runs: list[list] = []
    for p in positions:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return ",".join(p if n == 1 else f"{p}*{n}" for p, n in runs)


def deepnorm_alpha(position: str, num_layers: int) -> float:
    """Residual scale a: DeepNet's (2L)^(1/4), the reference code's fixed sqrt(8), else 1."""
    if position == "deepnorm":
        return (2 * num_layers) ** 0.25
    if position == "deeppost":
        return math.sqrt(8.0)
    return 1.0


def deepnorm_init_gain(position: str, num_layers: int) -> float | None:
    """xavier_normal gain for v, o, gate, up, down (None: not a DeepNorm layer)."""
    if position == "deepnorm":
        return (8 * num_layers) ** -0.25
    if position == "deeppost":
        return (8 * num_layers) ** 0.25
    return None


def lns_scale(position: str, layer_number: int) -> float:
    """LayerNorm Scaling: norm outputs of (1-based, global) layer l are multiplied by 1/sqrt(l)."""
    return 1.0 / math.sqrt(layer_number) if position == "lns" else 1.0


def select_layers(spec: str | None, positions, flag: str) -> tuple[int, ...]:
    """A layer selection -> sorted 1-based layer numbers. `spec`: None/'' (none), 'all', a position name
    ('pre', 'post', ...: the layers with that position) or numbers and ranges '1,4-6'. ValueError names `flag`."""
    if spec is None or str(spec).strip() in ("", "none"):
        return ()
    spec, L = str(spec).strip(), len(positions)
    if spec == "all":
        return tuple(range(1, L + 1))
    name = ALIASES.get(spec, spec)
    if name in POSITIONS:
        return tuple(l for l in range(1, L + 1) if positions[l - 1] == name)
    layers: set[int] = set()
    for item in (s.strip() for s in spec.split(",")):
        lo, _, hi = item.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"{flag}: {item!r} in {spec!r} is not a layer number or range; expected 'all', a "
                             f"position ({', '.join(POSITIONS)}) or 1-based layers such as '1,4-6'") from None
        if not 1 <= first <= last <= L:
            raise ValueError(f"{flag}: {item!r} is outside layers 1..{L}")
        layers.update(range(first, last + 1))
    return tuple(sorted(layers))
