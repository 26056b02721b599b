"""A fleet-wide bundle rollout through Ray Serve's own mechanism: a new `user_config` for the model deployment, which
the Serve controller applies to every replica by calling its reconfigure() (a few replicas at a time, as Ray rolls
deployment config changes), and to every replica it starts later.

`serve deploy` of an edited config file, or a changed RayService spec, does the same from outside. This module does
it from inside the cluster (POST /admin/reload): it reads the configs the controller last applied, changes the
deployment's user_config in one of them, and applies them all again, unchanged otherwise (a Serve config lists every
application it keeps). The controller client is the one `serve.status()` and `serve.get_app_handle()` use; Ray has
no public call that changes one deployment's user_config in place (`serve.run` replaces the replicas).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from recsae_core.common.errors import RecsaeError


class RolloutError(RecsaeError):
    """The rollout could not be submitted, or the controller reported it failed; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Rollout(NamedTuple):
    """A submitted rollout."""

    done: bool
    """Whether every replica runs the new config (the deployment is HEALTHY again) within the wait."""
    seconds: float
    """From the end of submitting until done, or until the wait ended."""
    replicas: int
    """Replicas of the deployment once done (or at the end of the wait)."""


def _client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client()


def applied_configs(client: Any) -> tuple[list[dict[str, Any]], float | None]:
    """Every application's config as the controller last applied it, and the target capacity."""
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**client.get_serve_details())
    configs = []
    for name, app in details.applications.items():
        if app.deployed_app_config is None:
            raise RolloutError(
                409, f"application {name!r} was deployed from Python, not from a Serve config; roll out with the "
                "tool that deployed it (serve deploy / the RayService spec)"
            )  # fmt: skip
        configs.append(app.deployed_app_config.model_dump(exclude_unset=True))
    return configs, details.target_capacity


def with_user_config(app: dict[str, Any], deployment: str, changes: dict[str, Any], full: dict[str, Any]) -> None:
    """Apply `changes` to `deployment`'s user_config in `app` (a config's application entry), in place; a deployment
    without an override in the config gets `full` (its current user_config) with the changes."""
    entries = app.setdefault("deployments", [])
    entry = next((e for e in entries if e.get("name") == deployment), None)
    if entry is None:
        entries.append(entry := {"name": deployment})
    entry["user_config"] = {**(entry.get("user_config") or full), **changes}


def submit(app_name: str, deployment: str, changes: dict[str, Any], current: dict[str, Any]) -> float | None:
    """Re-apply the controller's configs with `changes` in the deployment's user_config. Returns the application's
    deploy time before (the controller's clock, so that waiting compares times of one clock)."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    client = _client()
    before = serve.status().applications.get(app_name)
    configs, capacity = applied_configs(client)
    target = next((c for c in configs if c["name"] == app_name), None)
    if target is None:
        raise RolloutError(409, f"application {app_name!r} is not among the applied configs")
    with_user_config(target, deployment, changes, current)
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": configs, "target_capacity": capacity}))
    return before.last_deployed_time_s if before is not None else None


def wait(app_name: str, deployment: str, before: float | None, timeout_s: float, poll_s: float = 0.2) -> Rollout:
    """Wait until the controller reports the application redeployed (its deploy time is no longer `before`) and
    RUNNING, with every replica of the deployment RUNNING the new config (deployment HEALTHY)."""
    from ray import serve

    start = time.monotonic()
    deadline = start + timeout_s
    replicas = 0
    while True:
        app = serve.status().applications.get(app_name)
        if app is not None:
            dep = app.deployments.get(deployment)
            replicas = dep.replica_states.get("RUNNING", 0) if dep is not None else 0
            if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RolloutError(503, f"rollout failed: application {app_name!r} is {app.status}: {app.message}")
            settled = app.status == "RUNNING" and dep is not None and dep.status == "HEALTHY"
            if settled and app.last_deployed_time_s != before and set(dep.replica_states) == {"RUNNING"}:
                return Rollout(True, time.monotonic() - start, replicas)
        if time.monotonic() > deadline:
            return Rollout(False, time.monotonic() - start, replicas)
        time.sleep(poll_s)


def rollout(
    app_name: str, deployment: str, changes: dict[str, Any], current: dict[str, Any], timeout_s: float = 20.0
) -> Rollout:
    """Submit `changes` to the deployment's user_config and wait (up to `timeout_s`) until every replica runs it."""
    before = submit(app_name, deployment, changes, current)
    return wait(app_name, deployment, before, timeout_s)
