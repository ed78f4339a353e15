"""Which decoder layers a draft reads: defaults and validation for EAGLE-3 and DFlash.

Layer id ``i`` always names the output of decoder layer ``i`` (after its residual add, before
the final norm) = HF ``output_hidden_states[i + 1]``. SGLang and vLLM call the same tensor
``i + 1``. One exception on the HF side: transformers puts the FINAL-NORM output at
``hidden_states[L]``, so for ``i = L - 1`` the captured (pre-norm) output differs from it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "LayerIdError",
    "default_eagle3_aux_layer_ids",
    "validate_eagle3_aux_layer_ids",
    "default_dflash_layer_ids",
    "validate_dflash_layer_ids",
]


class LayerIdError(ValueError):
    """A requested set of capture layers is invalid for the target's depth."""


def default_eagle3_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3 default capture layers ``[1, L//2 - 1, L - 4]`` (Llama-3.1-8B, L=32: ``[1, 15, 28]``).

    Raises ``LayerIdError`` when ``L`` is too shallow for the recipe (the three ids collide or
    fall outside ``[0, L)``); pass explicit ``aux_layer_ids`` for such targets.
    """
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    out_of_range = [i for i in ids if not 0 <= i < num_layers]
    colliding = sorted({i for i in ids if ids.count(i) > 1})
    if out_of_range or colliding:
        problems = []
        if colliding:
            problems.append(f"ids {colliding} collide")
        if out_of_range:
            problems.append(f"ids {out_of_range} are outside [0, {num_layers})")
        raise LayerIdError(
            f"target with L={num_layers} decoder layers is too shallow for the default EAGLE-3 "
            f"aux layers [1, L//2 - 1, L - 4] = {ids} ({'; '.join(problems)}); "
            "pass aux_layer_ids explicitly (three distinct ids in [0, L))"
        )
    return ids


def _check_ints(ids: Sequence[object], what: str) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{what} must be a sequence of ints, got {type(ids).__name__}: {ids!r}")
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise TypeError(f"{what} must be ints, got {bad!r} in {list(ids)!r}")
    return [int(i) for i in ids]


def _check_distinct_in_range(ids: list[int], num_layers: int, what: str) -> None:
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise LayerIdError(f"{what} must be distinct, got {ids} (repeated: {duplicates})")
    out_of_range = [i for i in ids if not 0 <= i < num_layers]
    if out_of_range:
        raise LayerIdError(
            f"{what} {out_of_range} out of range for a target with L={num_layers} decoder layers; "
            f"ids must lie in [0, {num_layers})"
        )


def validate_eagle3_aux_layer_ids(aux_layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """Check ``aux_layer_ids`` is exactly three distinct ints in ``[0, num_layers)``; return them as a list."""
    ids = _check_ints(aux_layer_ids, "aux_layer_ids")
    if len(ids) != 3:
        raise LayerIdError(f"EAGLE-3 needs exactly three aux_layer_ids (low, mid, high), got {len(ids)}: {ids}")
    _check_distinct_in_range(ids, num_layers, "aux_layer_ids")
    return ids


def default_dflash_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """DFlash default context layers for a draft with ``num_draft_layers`` layers.

    One draft layer: ``[L // 2]``. ``n > 1`` layers: ``n`` ids evenly spaced over ``[1, L - 3]``,
    ``round(1 + k * (L - 4) / (n - 1))`` for ``k = 0..n-1``, so the first is 1 and the last L-3.
    Rounding is Python's ``round`` (half to even), as in the DFlash reference helper, so the ids
    agree with drafts trained there: L=10, n=5 gives ``[1, 2, 4, 6, 7]`` (2.5 -> 2, 5.5 -> 6).
    """
    if isinstance(num_draft_layers, bool) or not isinstance(num_draft_layers, int) or num_draft_layers < 1:
        raise LayerIdError(f"num_draft_layers must be a positive int, got {num_draft_layers!r}")
    if num_draft_layers == 1:
        ids = [num_target_layers // 2]
    else:
        start, end = 1, num_target_layers - 3
        span = end - start
        ids = [int(round(start + k * span / (num_draft_layers - 1))) for k in range(num_draft_layers)]
    if len(set(ids)) != len(ids) or any(not 0 <= i < num_target_layers for i in ids):
        raise LayerIdError(
            f"target with L={num_target_layers} decoder layers is too shallow for {num_draft_layers} "
            f"DFlash context layers evenly spaced over [1, L - 3]: got {ids}; "
            "pass target_layer_ids explicitly"
        )
    return ids


def validate_dflash_layer_ids(target_layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """Check ``target_layer_ids`` is a non-empty set of distinct ints in ``[0, num_layers)``; keep the order."""
    ids = _check_ints(target_layer_ids, "target_layer_ids")
    if not ids:
        raise LayerIdError("target_layer_ids is empty; DFlash needs at least one target layer to capture")
    _check_distinct_in_range(ids, num_layers, "target_layer_ids")
    return ids
