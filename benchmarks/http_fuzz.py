"""Fuzz the gateway's HTTP API from its OpenAPI schema with schemathesis: no input a 5xx.

Run:  .venv/bin/python benchmarks/http_fuzz.py --out results/http_fuzz [--runs 5] [--quick]

One embedded Ray (2 CPUs), a tiny trained run (digits, 3 shards), the gateway deployed with
two replicas on 127.0.0.1 (a free port), then ``schemathesis run <url>/openapi.json``
``--runs`` times, each with its own seed, with the bearer token so that /v1/forget and
/v1/audit are exercised past authentication, and the checks ``not_a_server_error`` (no 5xx)
and ``response_schema_conformance`` (``--continue-on-failure``). Every run's exit code, its number of 5xx answers
(counted from its NDJSON event log) and the failures schemathesis reported are written to
``<out>/http_fuzz.json``. Target: 0 answers 5xx in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _count_5xx(ndjson: Path) -> tuple[int, int]:
    """(responses, responses with a 5xx status) in a schemathesis NDJSON event log."""
    if not ndjson.exists():
        return 0, 0
    text = ndjson.read_text(errors="replace")
    statuses = [int(m) for m in re.findall(r'"status_code":\s*(\d{3})', text)]
    return len(statuses), sum(1 for s in statuses if s >= 500)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/http_fuzz"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-examples", type=int, default=60, help="per operation and run")
    ap.add_argument("--quick", action="store_true", help="1 run, 20 examples per operation")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.max_examples = 1, 20
    args.out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    os.environ["RAY_UNLEARN_API_TOKEN"] = token  # before ray.init: the replicas inherit it

    import ray
    from ray import serve

    from ray_unlearn.harness import free_port
    from ray_unlearn.platform.core.config import load_config
    from ray_unlearn.platform.core.run import create_run
    from ray_unlearn.platform.core.runtime import train_all_shards
    from ray_unlearn.serve.app import build_app

    root = Path(tempfile.mkdtemp(prefix="ru-fuzz-"))
    cfg = load_config(
        REPO / "configs/digits.yaml",
        [f"storage={root}", "partition.shards=3", "training.epochs=2", "model.hidden=[32]"],
    )
    ctx = create_run(cfg)
    train_all_shards(ctx)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app({"storage": ctx.storage.uri, "run_id": ctx.run_id, "num_replicas": 2}),
            name="ray-unlearn",
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{port}/openapi.json"
        exe = Path(sys.executable).parent / "schemathesis"
        for i in range(args.runs):
            ndjson = args.out / f"run{i}.ndjson"
            cmd = [
                str(exe), "run", url, "--checks", "not_a_server_error,response_schema_conformance",
                "--seed", str(1000 + i), "--max-examples", str(args.max_examples),
                "--header", f"Authorization: Bearer {token}", "--report", "ndjson",
                "--report-ndjson-path", str(ndjson), "--workers", "1", "--no-color",
                "--request-timeout", "60", "--continue-on-failure",
            ]  # fmt: skip
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            responses, errors_5xx = _count_5xx(ndjson)
            tail = r.stdout[-3000:].replace(token, "<token>")
            failures = re.search(r"(\d+) generated, (\d+) found (\d+) unique failures", r.stdout)
            runs.append(
                {
                    "run": i,
                    "seed": 1000 + i,
                    "exit_code": r.returncode,
                    "responses": responses,
                    "responses_5xx": errors_5xx,
                    "test_cases": int(failures.group(1)) if failures else None,
                    "unique_failures": int(failures.group(3)) if failures else 0,
                    "seconds": time.perf_counter() - t0,
                    "summary_tail": tail,
                }
            )
            print(f"run {i}: exit {r.returncode}, {responses} responses, {errors_5xx} 5xx")
    finally:
        serve.shutdown()
        ray.shutdown()
    doc = {
        "benchmark": "http_fuzz",
        "settings": {"runs": args.runs, "max_examples": args.max_examples, "replicas": 2},
        "runs": runs,
        "responses_5xx_total": sum(r["responses_5xx"] for r in runs),
        "no_5xx_in_every_run": all(r["responses_5xx"] == 0 for r in runs),
    }
    (args.out / "http_fuzz.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "runs"}))


if __name__ == "__main__":
    main()
