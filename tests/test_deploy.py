"""deploy/: the compose file, Prometheus and Grafana configuration, start scripts and the Dockerfile, checked
for structure and for agreement with each other and with the code (no Docker engine runs here)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from test_api import Env
from test_api_results import make_job
from test_metrics import broker, scrape  # noqa: F401 (broker is a fixture)

from gate.api import create_app
from gate.settings import load_settings
from gate.worker.app import QUEUES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE_DIR = "/opt/ftgate"  # the Dockerfile's WORKDIR for the code and deploy/
# Variables compose.yaml takes from the operator's environment (docs/operations.md); values for the test.
OPERATOR_VARIABLES = {"POSTGRES_PASSWORD": "secret-pg", "GRAFANA_ADMIN_PASSWORD": "secret-grafana"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


def interpolate(value):
    """``${NAME}``, ``${NAME:?message}`` and ``${NAME:-default}`` as compose resolves them."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: OPERATOR_VARIABLES[m.group(1)], value)
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    text = (DEPLOY / "compose.yaml").read_text()
    assert set(_VARIABLE.findall(text)) == set(OPERATOR_VARIABLES)
    assert all(":?" in m.group(0) for m in _VARIABLE.finditer(text)), "secrets must be required, not defaulted"
    return interpolate(yaml.safe_load(text))


def services(compose: dict, image_prefix: str = "") -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s.get("image", "").startswith(image_prefix)}


def ftgate_services(compose: dict) -> dict[str, dict]:
    return services(compose, "ftgate:")


def workers(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in ftgate_services(compose).items()
            if s.get("entrypoint") == [f"{IMAGE_DIR}/deploy/start-worker.sh"]}


def option(command: list[str], name: str) -> str | None:
    """The value after ``name`` in an argument list."""
    return command[command.index(name) + 1] if name in command else None


def dockerfile() -> tuple[set[str], set[str], list[str]]:
    """ARG names, stage names and FROM lines of the Dockerfile."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    args = {line.split()[1].partition("=")[0] for line in lines if line.startswith("ARG ")}
    froms = [line for line in lines if line.startswith("FROM ")]
    stages = {line.split()[3] for line in froms if len(line.split()) == 4 and line.split()[2].upper() == "AS"}
    return args, stages, froms


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume entry in short syntax."""
    return [tuple(entry.split(":")[:2]) for entry in service.get("volumes", [])]


def test_every_service_has_a_pinned_image_and_ftgate_images_build_from_the_dockerfile(compose):
    args, stages, froms = dockerfile()
    assert "FROM torch-${VARIANT} AS ftgate" in froms
    built: dict[str, dict] = {}
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image and ":" in image and not image.endswith(":latest"), (name, image)
        if not image.startswith("ftgate:"):
            assert "build" not in service, name
            continue
        build = service["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]).is_file()
        assert set(build["args"]) <= args, (name, set(build["args"]) - args)
        variant = build["args"]["VARIANT"]
        assert f"torch-{variant}" in stages and image == f"ftgate:{variant}", (name, variant, image)
        assert built.setdefault(image, build) == build, f"{image} is built two different ways"
    assert set(built) == {"ftgate:cpu", "ftgate:gpu"}


def test_redis_persists_every_message_and_never_evicts(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert option(command, "--appendonly") == "yes" and option(command, "--appendfsync") == "everysec"
    assert option(command, "--maxmemory-policy") == "noeviction"
    assert ("redis-data", "/data") in mounts(redis)
    assert compose["x-ftgate-env"]["FTGATE_BROKER_URL"] == "redis://redis:6379/0"


def test_one_gpu_per_worker_and_every_queue_served(compose):
    served = set()
    gpus = []
    for name, worker in workers(compose).items():
        assert worker["build"]["args"]["VARIANT"] == "gpu", name
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
        assert len(devices[0]["device_ids"]) == 1, f"{name} must reserve exactly one GPU"
        gpus += devices[0]["device_ids"]
        assert option(worker["command"], "--concurrency") in (None, "1"), name
        assert "--no-reaper" in worker["command"], f"{name}: the reaper service does that"
        served |= set(option(worker["command"], "--queues").split(","))
    assert len(gpus) == len(set(gpus)) >= 2, gpus
    assert served == set(QUEUES)
    assert compose["services"]["reaper"]["command"] == ["reaper"]


def test_healthchecks_gate_the_start_order(compose):
    everything = compose["services"]
    for name in ("redis", "postgres", "api", "prometheus"):
        assert everything[name]["healthcheck"]["test"][0] == "CMD", name
    for name, service in everything.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy" and "healthcheck" in everything[dependency], (name, dependency)
    assert set(everything["api"]["depends_on"]) == {"postgres", "redis"}
    for name in (*workers(compose), "reaper"):
        assert "api" in everything[name]["depends_on"], f"{name} must wait for the API's migration"
    api_port = option(everything["api"]["command"], "--bind").rpartition(":")[2]
    assert f"127.0.0.1:{api_port}/healthz" in " ".join(everything["api"]["healthcheck"]["test"])
    assert f"{api_port}:{api_port}" in everything["api"]["ports"]


def test_volumes_are_declared_and_bind_mounts_exist(compose):
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for source, target in mounts(service):
            assert target.startswith("/"), (name, target)
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in declared, f"{name} mounts the undeclared volume {source}"
                used.add(source)
    assert used == declared


def test_ftgate_containers_get_valid_settings(compose, tmp_path):
    """Every variable given to an ftgate container is one gate.settings reads, with a value it accepts; the
    metrics folder is container-local (not on a shared volume)."""
    ftgate = ftgate_services(compose)
    assert set(ftgate) == {"api", "reaper", *workers(compose)}
    for name, service in ftgate.items():
        env = service["environment"]
        assert all(key.startswith("FTGATE_") for key in env), (name, sorted(env))
        settings = load_settings(env={**env, "HOME": str(tmp_path)})  # raises on an unknown or bad setting
        assert settings.broker_url.startswith("redis://redis:") and "@postgres:5432/" in settings.database_url
        for source, target in mounts(service):
            assert not settings.metrics_dir.is_relative_to(target), f"{name}: metrics folder on the volume {source}"
        assert settings.state_dir in {Path(target) for _, target in mounts(service)}, name
    named = {v for path in DEPLOY.rglob("*") if path.is_file() for v in re.findall(r"FTGATE_\w+", path.read_text())}
    assert named <= set(compose["x-ftgate-env"]), named - set(compose["x-ftgate-env"])


def test_prometheus_scrapes_the_api_and_every_worker_on_their_ports(compose):
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
               for job in config["scrape_configs"]}
    api_port = option(compose["services"]["api"]["command"], "--bind").rpartition(":")[2]
    assert targets["ftgate-api"] == {f"api:{api_port}"}
    expected = set()
    for name, worker in workers(compose).items():
        assert option(worker["command"], "--metrics-host") == "0.0.0.0", f"{name}'s exporter must be reachable"
        expected.add(f"{name}:{option(worker['command'], '--metrics-port')}")
    assert targets["ftgate-workers"] == expected
    prometheus = compose["services"]["prometheus"]
    config_file = next(a.partition("=")[2] for a in prometheus["command"] if a.startswith("--config.file="))
    assert ("./prometheus.yml", config_file) in mounts(prometheus)


def test_prometheus_sends_an_operator_key_to_the_api(compose):
    """The API's /metrics takes an operator key: Prometheus reads it from the compose secret (the operator's
    METRICS_API_KEY), mounted where prometheus.yml's credentials_file points."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (api,) = [job for job in config["scrape_configs"] if job["job_name"] == "ftgate-api"]
    assert api["authorization"]["type"] == "Bearer"
    (secret,) = compose["services"]["prometheus"]["secrets"]
    assert api["authorization"]["credentials_file"] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret] == {"environment": "METRICS_API_KEY"}


def test_grafana_provisions_prometheus_and_the_dashboard(compose):
    grafana = dict(mounts(compose["services"]["grafana"]))
    assert grafana["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "--web.listen-address" not in " ".join(compose["services"]["prometheus"]["command"])  # default :9090
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "ftgate.yaml").read_text())["providers"]
    assert provider["options"]["path"] == grafana["./grafana/dashboards"]
    dashboards = list((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert panel["targets"] and all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"])


# One observation of every process-local instrument, in a process of the ``api`` group as the API records.
OBSERVE_ALL = textwrap.dedent("""
    import sys
    from pathlib import Path
    from gate import metrics

    metrics.start_group(Path(sys.argv[1]), "api")
    for stage in metrics.STAGES:
        with metrics.stage(stage):
            pass
    for model in metrics.AUDITED_MODELS:
        metrics.audit_images(model, 1)
    metrics.INTAKE_REJECTIONS.labels("not_a_zip").inc()
""")


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for rule in group["rules"]]


def test_prometheus_loads_the_alert_rules_and_each_rule_is_complete(compose):
    """The rules file is mounted where prometheus.yml loads it; every rule waits (``for``), has a severity and
    says what is wrong; ``up`` alerts name scrape jobs that exist."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert ("./alerts.yml", config["rule_files"][0]) in mounts(compose["services"]["prometheus"])
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    rules = alert_rules()
    assert {"FtgateQueueStalled", "FtgateReviewBacklog", "FtgateAuditsIncomplete", "FtgateWorkerDown"} <= \
        {r["alert"] for r in rules}
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert set(re.findall(r'\bup\{job="([^"]+)"', rule["expr"])) <= jobs, rule["alert"]


def test_dashboard_and_alerts_use_exactly_the_exported_metric_names(tmp_path, migrated, broker):  # noqa: F811
    """Every metric a dashboard query or an alert rule names is in a real scrape of /metrics, and every
    exported family is on the dashboard."""
    env = Env(tmp_path, migrated)
    make_job(env, "released")  # a dataset, a job, its run's end and its verdict in the database
    subprocess.run([sys.executable, "-c", OBSERVE_ALL, str(env.settings.metrics_dir)], cwd=ROOT, check=True,
                   timeout=60)
    url, _client = broker
    app = create_app(dataclasses.replace(env.settings, broker_url=url), dispatcher=env.dispatcher)
    families = scrape(env, app.test_client())
    exported = {s.name for f in families.values() for s in f.samples} | set(families)
    assert {"ftgate_queue_messages", "ftgate_stages_in_progress", "ftgate_stage_duration_seconds"} <= set(families)
    used = set()
    for path in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                names = set(re.findall(r"\bftgate_\w+", target["expr"]))
                assert names and names <= exported, (panel["title"], names - exported)
                used |= names
    covered = {f for f in families if any(n == f or n.startswith(f + "_") for n in used)}
    assert covered == set(families), set(families) - covered
    for rule in alert_rules():
        assert set(re.findall(r"\bftgate_\w+", rule["expr"])) <= exported, rule["alert"]


def test_dockerfile_installs_gunicorn_and_ships_the_start_scripts(compose):
    text = (ROOT / "Dockerfile").read_text()
    assert 'pip install -c constraints.txt ".[deploy]"' in text
    assert "COPY pyproject.toml README.md constraints.txt" in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"gunicorn\b", requirement) for requirement in extras["deploy"])
    assert f"WORKDIR {IMAGE_DIR}" in text and "COPY deploy ./deploy" in text
    assert "mkdir -p /var/lib/ftgate" in text  # the state volume's mount point, owned by the ftgate user
    for name, service in ftgate_services(compose).items():
        for script in service.get("entrypoint", []):
            path = DEPLOY / Path(script).relative_to(f"{IMAGE_DIR}/deploy")
            assert path.is_file() and path.stat().st_mode & 0o111, (name, script)


def test_start_scripts_migrate_then_serve_and_wait_for_the_schema():
    for script in DEPLOY.glob("*.sh"):
        subprocess.run(["sh", "-n", str(script)], check=True)
        assert script.read_text().startswith("#!/bin/sh\n") and "set -eu" in script.read_text(), script
    api = (DEPLOY / "start-api.sh").read_text()
    assert api.index("ftgate db upgrade") < api.index("exec gunicorn --config /opt/ftgate/deploy/gunicorn.conf.py")
    assert '"gate.api:create_app()"' in api
    worker = (DEPLOY / "start-worker.sh").read_text()
    assert worker.index("ftgate db current") < worker.index('exec ftgate worker "$@"')


def test_gunicorn_hooks_start_the_api_group_and_drop_exited_workers(tmp_path):
    """gunicorn.conf.py's on_starting wipes and opens the API's metrics folder before workers fork (a stale
    file goes); child_exit removes an exited worker's live gauges and keeps its counts."""
    metrics_dir = tmp_path / "metrics"
    stale = metrics_dir / "api" / "counter_999999.db"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a previous run")
    script = textwrap.dedent("""
        import multiprocessing, runpy, sys, types
        from gate import metrics

        def worker():
            with metrics.stage("validate"):
                pass

        hooks = runpy.run_path(sys.argv[1])
        hooks["on_starting"](None)
        child = multiprocessing.get_context("fork").Process(target=worker)
        child.start()
        child.join()
        print(child.pid, flush=True)
        sys.stdin.readline()
        hooks["child_exit"](None, types.SimpleNamespace(pid=child.pid))
    """)
    env = {"FTGATE_STATE_DIR": str(tmp_path / "state"), "FTGATE_METRICS_DIR": str(metrics_dir), "HOME": str(tmp_path),
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(DEPLOY / "gunicorn.conf.py")], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = proc.stdout.readline().strip()
    folder = metrics_dir / "api"
    assert not stale.exists()
    assert (folder / f"gauge_livesum_{pid}.db").is_file() and (folder / f"histogram_{pid}.db").is_file()
    proc.communicate("exit\n", timeout=60)
    assert proc.returncode == 0
    assert not (folder / f"gauge_livesum_{pid}.db").exists() and (folder / f"histogram_{pid}.db").is_file()
