"""One bundle as a replica serves it: the engine (compute), the catalog, and the request and response sides, loaded
together and swapped together when the bundle or the edit bounds change."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsae_core.bundle.format import Bundle, load_bundle
from recsae_core.sae.edits import EditBounds
from recsae_core.sae.runtime import SAERuntime
from service.engine import Engine
from service.requests import RequestParser
from service.responses import Responses
from service.steering import Catalog, head_items


@dataclass
class Served:
    """Everything one replica needs to answer requests for one bundle."""

    bundle: Bundle
    """The verified bundle."""
    engine: Engine
    """represent -> SAE -> steer -> rank, a batch at a time."""
    catalog: Catalog
    """Concept names and the bundle's policies, validated against the bounds."""
    requests: RequestParser
    """RecommendRequest -> Row."""
    responses: Responses
    """Row + RowResult -> JSON, and the catalog's listings."""
    popularity: np.ndarray
    """(n_items,) training interactions per item (served-list metrics)."""
    head: np.ndarray
    """(n_items,) bool: the head items (the rest is the tail), as the offline bias metrics define it."""

    @classmethod
    def load(cls, folder: str | Path, threads: int = 1, bounds: EditBounds | None = None) -> Served:
        """Load, verify and warm up the bundle in `folder`; `threads` for ONNX Runtime."""
        bundle = load_bundle(Path(folder))
        sae = SAERuntime.load(bundle.sae_folder)
        engine = Engine(bundle, sae, threads)
        catalog = Catalog(bundle, sae.stats, sae.n_latents, bounds or EditBounds())
        popularity = np.asarray(bundle.items["popularity"], dtype=np.float64)
        return cls(
            bundle,
            engine,
            catalog,
            RequestParser(bundle, catalog),
            Responses(bundle, catalog, sae, engine.emb_t),
            popularity,
            head_items(popularity),
        )

    @property
    def versions(self) -> dict[str, str | None]:
        """The bundle's version ids (bundle, model, SAE, catalog)."""
        return self.responses.versions
