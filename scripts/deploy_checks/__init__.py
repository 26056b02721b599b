"""Offline validators of the deployment artifacts: `python -m scripts.deploy_checks {crd,dashboard,promql}`."""
