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


def _readme_submit_line() -> list[str]:
    """The README's `ray job submit` command, as written (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("ray job submit --address"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    return block.split()


@pytest.mark.slow
@pytest.mark.ray
def test_readme_ray_job_submit_runs_a_sweep(tmp_path):
    """The README's `ray job submit` line, run as written from the repository root against a
    local head on loopback, with the runtime env it names (cluster/runtime_env.yaml: the uploaded
    working dir installed into a job virtualenv), a 2-trial synthetic sweep appended. The head
    is started without the package's environment on PATH: `rayunlearn` must come from the
    runtime env. Its tables are found, then the head is stopped (always, in the finaliser)."""
    pytest.importorskip("aiohttp", reason="ray job submit needs ray[default] (the dashboard)")
    venv_bin = str(Path(sys.executable).parent)
    ray_bin = shutil.which("ray", path=venv_bin) or shutil.which("ray")
    port, dash = _free_port(), _free_port()
    # RAY_AUTH_MODE=disabled: a token in ~/.ray would otherwise switch on token auth for this head
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    import tempfile

    # short: Ray's unix socket paths under the temp dir must stay < 108 characters
    tmpdir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    start = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
             f"--dashboard-agent-listen-port={_free_port()}",
             f"--temp-dir={tmpdir}", "--disable-usage-stats"]
    results = tmp_path / "results"
    line = _readme_submit_line()
    assert line[:3] == ["ray", "job", "submit"] and "cluster/runtime_env.yaml" in line
    assert line[line.index("--") + 1:line.index("--") + 3] == ["rayunlearn", "sweep"]
    line = [ray_bin] + line[1:]
    line[line.index("--address") + 1] = f"http://127.0.0.1:{dash}"      # this head's port
    line = [f"results={results}" if a.startswith("results=") else a for a in line]
    line[line.index("sweep") + 1] = "tiny"
    cmd = line + ["name=job", "num_samples=2", "prepare.enabled=false",
                  "trainable=rayunlearn.sweep.synthetic:synthetic_trial"]
    try:
        subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
        for _ in range(12):     # the job agent starts a few seconds after the head
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
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
