"""cluster/: the launcher configs validate against Ray's cluster-config schema, and (slow) a
real `ray job submit` of a tiny sweep to a local Ray head on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _schema():
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", ["local.yaml", "aws.yaml", "gcp.yaml"])
def test_launcher_config_matches_ray_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(cfg, _schema())
    assert cfg["cluster_name"].startswith("rayunlearn")
    if name != "local.yaml":
        types = cfg["available_node_types"]
        assert cfg["head_node_type"] in types
        gpu_types = [t for t in types if t != cfg["head_node_type"]]
        assert gpu_types and all(types[t]["min_workers"] == 0 for t in gpu_types)   # autoscaling from 0
        assert any('"torch==2.13.0"' in c for c in cfg["setup_commands"])           # pinned torch


def test_schema_rejects_a_broken_config():
    jsonschema = pytest.importorskip("jsonschema")
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    cfg["max_workerz"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _schema())


def test_runtime_env_and_submit_script():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= {"pip", "env_vars", "excludes", "working_dir", "uv"}
    assert any(p.startswith("torch==") for p in env["pip"]["packages"])
    text = (CLUSTER / "submit.sh").read_text()
    assert "ray job submit" in text and "--working-dir ." in text and "rayunlearn sweep" in text
    assert os.access(CLUSTER / "submit.sh", os.X_OK)
    assert (CLUSTER / "README.md").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_runs_a_sweep(tmp_path):
    """A local head with the job server, `ray job submit` of a 2-trial synthetic sweep, its
    tables found, then `ray stop` (always, in the finaliser)."""
    pytest.importorskip("aiohttp", reason="ray job submit needs ray[default] (the dashboard)")
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    port, dash = _free_port(), _free_port()
    # RAY_AUTH_MODE=disabled: a token in ~/.ray would otherwise switch on token auth for this head
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS")
    import tempfile

    # short: Ray's unix socket paths under the temp dir must stay < 108 characters
    tmpdir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    start = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
             f"--dashboard-agent-listen-port={_free_port()}",
             f"--temp-dir={tmpdir}", "--disable-usage-stats"]
    results = tmp_path / "results"
    try:
        subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
        address = f"http://127.0.0.1:{dash}"
        space = "tiny"      # a shipped space, by name (package data)
        # the package is installed in this environment: no runtime_env install needed
        cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT),
               "--runtime-env-json", json.dumps({"excludes": [".venv/", "results/", ".git/"]}), "--",
               sys.executable, "-m", "rayunlearn", "sweep", str(space), f"results={results}", "name=job",
               "num_samples=2", "prepare.enabled=false", "trainable=rayunlearn.sweep.synthetic:synthetic_trial"]
        for _ in range(12):     # the job agent starts a few seconds after the head
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
            if "No available agent" not in out.stdout + out.stderr:
                break
            time.sleep(5)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in (out.stdout + out.stderr).lower()
        import pyarrow.parquet as pq

        rows = pq.read_table(results / "job" / "trials.parquet").to_pylist()
        assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
        assert (results / "job" / "pareto.json").exists()
    finally:
        _stop_head(tmpdir)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _stop_head(tmpdir: Path) -> None:
    """Stop exactly the processes of this head (their command lines name its temp dir), by
    pid: `ray stop` would also stop other Ray instances of this user on the machine."""
    import psutil

    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(tmpdir) in part for part in (p.info["cmdline"] or [])):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in mine:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
