"""Retention: how much of the dense model's accuracy a pruned model keeps, as the papers report it."""
from __future__ import annotations

from typing import Mapping

from ..errors import VlmpruneError


def retention(pruned: Mapping[str, Mapping], dense: Mapping[str, Mapping]) -> float | None:
    """Mean over tasks of ``pruned accuracy / dense accuracy``, in percent.

    Both arguments are the ``"tasks"`` part of an eval result (``{name: {"accuracy", "n", ...}}``) on
    the same items; only those two keys are read, so a reference written before per-item outcomes were
    recorded still serves. A task where the dense model scores 0 has no ratio and is left out; ``None``
    when no task is left.
    """
    if set(pruned) != set(dense):
        raise VlmpruneError(
            f"retention needs the same tasks: pruned has {sorted(pruned)}, dense has {sorted(dense)}")
    for name in pruned:
        if pruned[name]["n"] != dense[name]["n"]:
            raise VlmpruneError(
                f"retention needs the same items: task {name!r} has {pruned[name]['n']} pruned and "
                f"{dense[name]['n']} dense items")
    ratios = [pruned[name]["accuracy"] / dense[name]["accuracy"] for name in pruned
              if dense[name]["accuracy"] > 0]
    if not ratios:
        return None
    return 100.0 * sum(ratios) / len(ratios)
