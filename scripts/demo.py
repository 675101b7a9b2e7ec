"""Run the example ML pipeline end to end on the local backend and show where everything landed.

    make demo                                  # the quick scenario set
    make demo SCENARIOS=full                   # every scenario
    python scripts/demo.py --backend docker    # the same pipeline in containers (needs the engine + images)

Uses a private Airflow home (./.airflow-home) and artifact root (./artifacts) unless AIRFLOW_HOME /
REMOTE_ML_ARTIFACT_ROOT are set; no service is needed for the local backend.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="local")
    parser.add_argument("--scenarios", default="quick", choices=["quick", "review", "full"])
    args = parser.parse_args()

    env = os.environ.copy()
    home = Path(env.setdefault("AIRFLOW_HOME", str(REPO / ".airflow-home")))
    artifacts = Path(env.setdefault("REMOTE_ML_ARTIFACT_ROOT", str(REPO / "artifacts")))
    env.setdefault("REMOTE_ML_LOCAL_STATE_DIR", str(home / "local-jobs"))
    env["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
    env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    home.mkdir(parents=True, exist_ok=True)
    airflow = [sys.executable, "-m", "airflow"]

    print(f"Airflow home: {home}\nArtifact root: {artifacts}\n", flush=True)
    migrated = subprocess.run([*airflow, "db", "migrate"], env=env, capture_output=True, text=True)
    if migrated.returncode != 0:
        print(migrated.stdout[-2000:], migrated.stderr[-4000:], sep="\n", file=sys.stderr)
        return migrated.returncode

    conf = json.dumps({"backend": args.backend, "scenario_set": args.scenarios})
    print(f"$ airflow dags test example_ml_pipeline -c '{conf}'", flush=True)
    log_path = home / "demo-run.log"
    with open(log_path, "w", encoding="utf-8") as log:
        run = subprocess.run([*airflow, "dags", "test", "example_ml_pipeline", "-c", conf], env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if run.returncode != 0 or "state=success" not in text:
        print(text[-6000:], file=sys.stderr)
        print(f"\nThe pipeline failed; full log: {log_path}", file=sys.stderr)
        return run.returncode or 1

    runs = sorted((artifacts / "example_ml_pipeline").iterdir(), key=lambda p: p.stat().st_mtime)
    run_dir = runs[-1]
    print(f"\nPipeline succeeded (full log: {log_path}).\nArtifacts of run {run_dir.name}:\n")
    manifests = [(json.loads(path.read_text()), path) for path in run_dir.glob("*/*/*/manifest.json")]
    for manifest, manifest_path in sorted(manifests, key=lambda item: item[0].get("finished_at") or 0):
        step = manifest_path.relative_to(run_dir).parts
        label = step[0] + ("" if step[1] == "map_-1" else f"[{step[1][4:]}]")
        print(f"  {label}")
        for name, out in manifest["outputs"].items():
            print(f"    output {name}: {out['uri']} ({out['size']} bytes, sha256 {out['sha256'][:12]}…)")
        if manifest["metrics"]:
            print(f"    metrics: {json.dumps(manifest['metrics'], sort_keys=True)}")
        print(f"    version record: {manifest_path}")
    selection = next(run_dir.glob("pick_best/*/*/outputs/selection"), None)
    if selection:
        chosen = json.loads(selection.read_text())
        print(f"\nBest scenario: {chosen['scenario']} (test RMSE {chosen['test_rmse']})")
    # The same table and plots as the Airflow UI's "Remote ML" view, as one file that needs no server.
    from airflow_remote_ml.core.artifacts import decode_segment
    from airflow_remote_ml.core.report import write_report

    run_id = decode_segment(run_dir.name) or run_dir.name
    report = write_report(str(artifacts), "example_ml_pipeline", run_id)
    print(f"\nReport (steps, metrics by scenario, lineage): {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
