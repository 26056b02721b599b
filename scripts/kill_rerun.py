"""Crash safety of the offline pipeline (issue 17): `recsae pipeline` is killed with SIGKILL at seeded random points in
every step, rerun each time, and every run that finishes is checked: each step's files against its completion
record, and the bundle as the service loads it. Prints and saves JSON.

    python scripts/kill_rerun.py --out runs/kill-rerun [--kills 10] [--force-kills 4] [--seed 0]

First an uninterrupted reference run measures each step's duration. Then cycles start from an empty run folder: each
launch waits for the next step's "running" line and kills the process a random time into that step (uniform over its
reference duration), the next launch resumes, and so on until a launch finishes; every step is aimed at once per
cycle. `--force-kills` more launches redo a finished run with `--force` and are killed in a random step, so that
old outputs and half-redone ones meet; a plain rerun then has to finish with everything consistent. After every
kill no step may read as corrupt: a kill leaves the old complete state or one the rerun finds unfinished.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from recsae_core.bundle.format import load_bundle
from recsae_core.common.artifacts import write_json
from recsae_core.common.errors import ArtifactError, IncompleteError
from recsae_core.common.layout import SAE_WEIGHTS, RunLayout

STEPS = ("recommender", "probe", "sae", "concepts", "bundle")
RUNNING = re.compile(r"^\[(\d)/5\] (\w+): running$")
DONE = re.compile(r"^\[(\d)/5\] (\w+): done in ([0-9.]+)s$")


class Launch:
    """One `recsae pipeline` process; a thread collects its stdout lines."""

    def __init__(self, argv: list[str], stderr: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with stderr.open("ab") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line, or None once the process has closed its output."""
        line = self._queue.get(timeout=timeout)
        if line is not None:
            self.lines.append(line)
        return line

    def running(self) -> str | None:
        """The step running now: the last one announced and not reported done."""
        started = [m.group(2) for line in self.lines if (m := RUNNING.match(line))]
        done = {m.group(2) for line in self.lines if (m := DONE.match(line))}
        return started[-1] if started and started[-1] not in done else None

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        while self.next_line(timeout=10) is not None:
            pass
        return code


def state(run: Path) -> dict[str, str]:
    """Each step as the pipeline would judge it: intact, incomplete (to redo) or corrupt (a changed file)."""
    layout = RunLayout(run)
    checks = {"recommender": layout.verify_recommender, "probe": layout.verify_probe, "sae": layout.verify_sae,
              "concepts": layout.verify_catalog, "bundle": layout.verify_bundle}  # fmt: skip
    out = {}
    for step, verify in checks.items():
        try:
            verify()
            out[step] = "intact"
        except IncompleteError:
            out[step] = "incomplete"
        except ArtifactError as err:
            out[step] = f"corrupt: {err}"
    return out


def verified(run: Path) -> dict[str, Any]:
    """A finished run: every step intact and the bundle loading as the service loads it; raises otherwise."""
    states = state(run)
    if any(s != "intact" for s in states.values()):
        raise AssertionError(f"{run}: a finished pipeline left {states}")
    bundle = load_bundle(RunLayout(run).bundle)
    return {"bundle_version": bundle.manifest["versions"]["bundle"],
            "sae_sha256": bundle.manifest["files"][f"sae/{SAE_WEIGHTS}"]}  # fmt: skip


def pipeline_argv(args: argparse.Namespace, run: Path, force: bool = False) -> list[str]:
    return [sys.executable, "-m", "recsae_core.pipeline.cli", "pipeline", "--dataset", args.dataset, "--model",
            args.model, "--out", str(run), "--epochs", str(args.epochs), "--latents", str(args.latents), "--k",
            str(args.k), "--sae-epochs", str(args.sae_epochs), "--quiet", *(["--force"] if force else [])]  # fmt: skip


def kill_in(launch: Launch, target: str, window: float, rng: random.Random, timeout: float) -> dict[str, Any]:
    """Wait for `target` (or a later step) to start, then SIGKILL a random time into `window` seconds. Returns the
    step the process was in by its own output (`after:STEP` between two steps; None: it finished first)."""
    deadline = time.monotonic() + timeout
    while True:
        line = launch.next_line(timeout=max(deadline - time.monotonic(), 0.1))
        if line is None:
            return {"target": target, "hit": None, "delay_s": None, "exit": launch.finish(timeout)}
        m = RUNNING.match(line)
        if m and STEPS.index(m.group(2)) >= STEPS.index(target):
            break
    delay = rng.uniform(0, window)
    end = time.monotonic() + delay
    while time.monotonic() < end and launch.proc.poll() is None:
        time.sleep(0.01)
    if launch.proc.poll() is not None:
        return {"target": target, "hit": None, "delay_s": round(delay, 3), "exit": launch.finish(timeout)}
    launch.proc.send_signal(signal.SIGKILL)
    code = launch.finish(60)  # everything it printed before dying says where it was
    done = [m.group(2) for line in launch.lines if (m := DONE.match(line))]
    hit = launch.running() or f"after:{done[-1]}"
    return {"target": target, "hit": hit, "delay_s": round(delay, 3), "exit": code}


def position(hit: str) -> int:
    """Index in STEPS of the step a kill hit (a kill between two steps counts as the first one's)."""
    return STEPS.index(hit.removeprefix("after:"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng, started = random.Random(args.seed), time.monotonic()
    stderr = out / "stderr.log"

    reference = Launch(pipeline_argv(args, out / "reference"), stderr)
    if reference.finish(args.timeout) != 0:
        raise SystemExit(f"the reference run failed; see {stderr}")
    durations = {m.group(2): float(m.group(3)) for line in reference.lines if (m := DONE.match(line))}
    finished = [verified(out / "reference")]

    kills: list[dict[str, Any]] = []
    reruns = 0
    cycle = 0
    while len([k for k in kills if k["hit"]]) < args.kills:
        folder, targets = out / f"cycle-{cycle}", list(STEPS)
        while True:
            launch = Launch(pipeline_argv(args, folder), stderr)
            if not targets or len([k for k in kills if k["hit"]]) >= args.kills:
                code = launch.finish(args.timeout)
                reruns += 1
                if code != 0:
                    raise AssertionError(f"{folder}: rerun exited {code}; see {stderr}")
                finished.append(verified(folder))
                break
            target = targets.pop(0)
            kill = kill_in(launch, target, durations[target], rng, args.timeout)
            if kill["hit"] is None:  # finished before the kill: the cycle is over
                if kill["exit"] != 0:
                    raise AssertionError(f"{folder}: launch exited {kill['exit']}; see {stderr}")
                reruns += 1
                finished.append(verified(folder))
                break
            targets = [t for t in targets if STEPS.index(t) > position(kill["hit"])]
            kills.append({"cycle": cycle, "force": False, **kill, "after": state(folder)})
        cycle += 1

    forced = out / "reference"
    for _ in range(args.force_kills):
        target = rng.choice(STEPS)
        kill = kill_in(Launch(pipeline_argv(args, forced, force=True), stderr), target, durations[target], rng,
                       args.timeout)  # fmt: skip
        kills.append({"cycle": "force", "force": True, **kill, "after": state(forced)})
        launch = Launch(pipeline_argv(args, forced), stderr)
        if launch.finish(args.timeout) != 0:
            raise AssertionError(f"{forced}: rerun after a --force kill failed; see {stderr}")
        reruns += 1
        finished.append(verified(forced))

    corrupt = [k for k in kills if any(s.startswith("corrupt") for s in k["after"].values())]
    strays = sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.name.endswith((".tmp", ".old")))
    return {
        "command": " ".join(["python scripts/kill_rerun.py", *sys.argv[1:]]),
        "pipeline": " ".join(pipeline_argv(args, Path("RUN"))[2:]),
        "reference_step_seconds": durations,
        "kills": len([k for k in kills if k["hit"]]),
        "steps_hit": dict(Counter(k["hit"] for k in kills if k["hit"])),
        "kills_after_finish": len([k for k in kills if not k["hit"]]),
        "reruns_completed": reruns,
        "corrupt_after_a_kill": len(corrupt),
        "finished_runs_verified": len(finished),
        "distinct_sae_weights": len({f["sae_sha256"] for f in finished}),
        "stray_temp_files": strays,
        "seconds": round(time.monotonic() - started, 1),
        "detail": kills,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (replaced); writes OUT/kill_rerun.json")
    parser.add_argument("--kills", type=int, default=10, help="kills that land inside a step (cycles from empty runs)")
    parser.add_argument("--force-kills", type=int, default=4, help="kills of a --force rerun of a finished run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--model", default="bprmf")
    parser.add_argument("--epochs", type=int, default=2, help="recommender epochs (tiny: this is about crashes)")
    parser.add_argument("--latents", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--sae-epochs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds one launch may take")
    args = parser.parse_args()
    result = run(args)
    write_json(args.out / "kill_rerun.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "detail"}, indent=1))


if __name__ == "__main__":
    main()
