"""The test bundle (tests/bundle_fixture.py) bundled again with fitted policies, fit on its own data with the
functions the offline sweep uses (recsae_core.debias.policy_kinds): every user's h from the bundle's ONNX model on
its stored inputs, the item matrix and popularity, and ML-100K's gender column. The policies are written as
`recsae debias` writes them and bundled by `write_bundle` with everything else of the bundle, so the service loads
them as it loads any bundle's (a separate bundle: the shared one keeps its two edit policies, which other tests count).

- `erase-gender`: LEACE, anchored at the midpoint of the two groups' means, t = 1;
- `calibrated-popularity`: the popularity direction, strength per user from the list-history gap, t = 1;
- `spectral-popularity`: each user's loading on the top singular direction of H E^T halved (t = 0.5);
- `popsteer-popularity`: PopSteer's shift from users in the top against the bottom quartile of history popularity
  (real profiles stand in for synthetic ones here), alpha 1.5;
- `erase-other-sae`: erase-gender's arrays, recorded as made for another SAE (refused by the service).
"""

from __future__ import annotations

import json
import tempfile
from itertools import pairwise
from pathlib import Path

import numpy as np

from recsae_core.bundle.format import BundleContents, load_bundle, verify_bundle, write_bundle
from recsae_core.bundle.inputs import InputSpec
from recsae_core.common.errors import RecsaeError
from recsae_core.common.onnx import h_output, open_onnx
from recsae_core.data.datasets import Dataset
from recsae_core.debias.policy_kinds import (
    fit_calibrated,
    fit_erase,
    fit_popsteer_policy,
    fit_spectral_policy,
    policy_document,
    with_report,
)
from recsae_core.debias.targets import parse_target, user_groups
from recsae_core.sae.runtime import SAERuntime
from service.steering import bundle_identity


def bundle_h(onnx_path: Path, inputs: InputSpec, user_inputs: dict[str, np.ndarray]) -> np.ndarray:
    """(n_users, d) h of every user, from the bundle's ONNX model on the inputs the bundle stores (what the service
    feeds for a known user)."""
    session = open_onnx(onnx_path)
    return session.run([h_output(session, onnx_path)], {name: user_inputs[name] for name in inputs.names})[0]


def gender(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(known, female) per user, from ML-100K's gender column."""
    groups = user_groups(data, parse_target("gender"))
    return groups.known, groups.member


def write_fitted_policies(source: Path, data: Dataset, out: Path) -> list[Path]:
    """Fit the policies above on the bundle in `source` and write them into the folder `out`; returns their paths."""
    bundle = load_bundle(source)
    h = bundle_h(bundle.model_path, bundle.inputs, bundle.user_inputs)
    sae = SAERuntime.load(bundle.sae_folder)
    names = {int(c["latent"]): c["name"] for c in (bundle.catalog or {}).get("concepts", [])}
    made_for = {k: v for k, v in bundle_identity(bundle.manifest).items() if v is not None}
    known, female = gender(data)
    emb, popularity = bundle.item_embeddings, np.asarray(bundle.items["popularity"], dtype=np.float64)
    history_pop = np.array([np.log1p(popularity[bundle.seen_items[a:b]]).mean() if b > a else 0.0
                            for a, b in pairwise(bundle.seen_indptr)])  # fmt: skip
    low, high = np.quantile(history_pop, [0.25, 0.75])
    fitted = {
        "erase-gender": (fit_erase(h[known], female[known], "leace", 1, "midpoint", 1.0), "gender"),
        "calibrated-popularity": (fit_calibrated(h, emb, popularity, strength=1.0, list_k=10), "popularity"),
        "spectral-popularity": (fit_spectral_policy(h, emb, strength=0.5), "popularity"),
        "popsteer-popularity": (
            fit_popsteer_policy(sae, h[history_pop >= high], h[history_pop <= low], alpha=1.5),
            "popularity",
        ),
    }
    paths = []
    for name, (policy, target) in fitted.items():
        policy = with_report(policy, sae.w_dec, names)
        doc = policy_document(policy, name, target, f"test {policy.kind} policy ({target})", made_for)
        paths.append(out / f"{name}.json")
        paths[-1].write_text(json.dumps(doc))
    other = json.loads((out / "erase-gender.json").read_text())
    other["made_for"] = {**made_for, "sae_sha256": "0" * 64}
    other["description"] = "erase-gender, recorded as made for another SAE"
    paths.append(out / "erase-other-sae.json")
    paths[-1].write_text(json.dumps(other))
    return paths


def bundle_with_fitted_policies(source: Path, data: Dataset, out: Path) -> Path:
    """`source`'s bundle written again to `out` (reused when `out` already holds a verified bundle) with its own
    policies and the fitted ones."""
    try:
        verify_bundle(out)
        return out
    except RecsaeError:
        pass
    bundle = load_bundle(source)
    items, manifest = bundle.items, bundle.manifest
    catalog = source / "concepts" / "catalog.json"
    with tempfile.TemporaryDirectory() as tmp:
        fitted = write_fitted_policies(source, data, Path(tmp))
        contents = BundleContents(
            onnx_path=bundle.model_path, inputs=bundle.inputs, item_embeddings=bundle.item_embeddings,
            item_ids=items["ids"], titles=items["titles"], genres=items["genres"],
            popularity=np.asarray(items["popularity"]), user_ids=bundle.user_ids, user_inputs=bundle.user_inputs,
            seen=(bundle.seen_indptr, bundle.seen_items), sae_folder=bundle.sae_folder,
            meta={"dataset": manifest.get("dataset"), "model": manifest.get("model_type"), **manifest["provenance"]},
            item_bias=bundle.item_bias, foldin=bundle.foldin, years=np.asarray(items["years"]),
            catalog_path=catalog if catalog.is_file() else None,
            policy_paths=sorted((source / "policies").glob("*.json")) + fitted, model_index=bundle.model_index,
        )  # fmt: skip
        write_bundle(contents, out, parity=manifest.get("parity"))
    return out
