"""The configuration of concept control (`recsae_core.concepts.control`). Imports no torch, so the command line can
build its parser without it; the `concept-control` options derive from the fields (pipeline.options)."""

from __future__ import annotations

from dataclasses import dataclass

from recsae_core.common.ranges import Fraction, PositiveInt, check_fields


@dataclass
class ConceptControlConfig:
    """How concept control is measured (defaults: the issue's figure)."""

    min_users: PositiveInt = 10
    """Affected users a concept needs at validation and at test to be measured."""
    goal: Fraction = 0.5
    """Target drop the chosen op should reach on the affected validation users."""
    budget: Fraction = 0.02
    """Largest relative NDCG@10 loss on the affected validation users an op may cost."""
    max_collateral: Fraction = 0.1
    """Largest collateral on the affected validation users an op may cause."""
    progress: bool = True
    """Progress bars."""

    def __post_init__(self) -> None:
        check_fields(self)
