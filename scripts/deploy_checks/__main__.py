"""Offline validators of the deployment artifacts (scripts/check_deploy.sh and tests/test_deploy.py run them).

    python -m scripts.deploy_checks crd [--crds DIR] [--expect KIND] MANIFEST.yaml|- ...
    python -m scripts.deploy_checks dashboard DASHBOARD.json ...
    python -m scripts.deploy_checks promql [--promtool PATH] DASHBOARD.json ...

crd        Custom resources against the KubeRay CRDs vendored in deploy/kuberay/crds/, as strictly as the API server
           with strict field validation (`kubectl apply --validate=strict`): unknown and duplicate fields refused,
           nulls of non-nullable fields dropped and defaults applied before the openAPIV3Schema is checked, list-type
           map/set entries unique, metadata checked as a Kubernetes ObjectMeta (kubernetes-validate's schema).
dashboard  Grafana dashboards against a JSON schema derived from the typed models of the PyPI package
           grafana-foundation-sdk (pinned in scripts/install_tools.sh): every model closed to unknown fields, types
           and enums checked; panel options, field-config `custom` and queries also against the panel plugin's and
           the datasource's models.
promql     Every Prometheus query of a dashboard, its Grafana variables substituted, parsed by `promtool check rules`.

Every problem is printed on its own line, `ERROR <file> <where>: <what>`; the exit status is 1 when there is one and
2 for bad usage or a missing tool. Run from the repository root (check_deploy.sh and the tests do): `scripts` is a
namespace package there, and this folder stays outside the installed library.
"""

from __future__ import annotations

import argparse
import sys

from .common import ToolMissing
from .crd import CRD_DIR, check_crd
from .dashboard import check_dashboard
from .promql import check_promql

PROG = "python -m scripts.deploy_checks"  # argparse would say __main__.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    crd = sub.add_parser("crd", help="custom resources against the vendored KubeRay CRDs (strict)")
    crd.add_argument("--crds", default=str(CRD_DIR), help="folder of CRD YAML files (default: %(default)s)")
    crd.add_argument("--expect", action="append", default=[], metavar="KIND", help="each file must hold one")
    crd.add_argument("manifests", nargs="+", metavar="MANIFEST")
    crd.set_defaults(run=check_crd)
    dash = sub.add_parser("dashboard", help="Grafana dashboards against grafana-foundation-sdk's models")
    dash.add_argument("dashboards", nargs="+", metavar="DASHBOARD")
    dash.set_defaults(run=check_dashboard)
    promql = sub.add_parser("promql", help="every dashboard query parsed by promtool")
    promql.add_argument("--promtool", help="promtool binary (default: $PROMTOOL, then PATH)")
    promql.add_argument("dashboards", nargs="+", metavar="DASHBOARD")
    promql.set_defaults(run=check_promql)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ToolMissing as e:
        print(f"validate_deploy: {e}", file=sys.stderr)  # the old script's name: messages unchanged by the split
        return 2


if __name__ == "__main__":
    sys.exit(main())
