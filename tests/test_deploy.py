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


# deploy/multihost/: what its two files take from each host's operator.
MULTIHOST = DEPLOY / "multihost"
MULTIHOST_VARIABLES = {"POSTGRES_PASSWORD": "secret-pg", "REDIS_PASSWORD": "secret-redis",
                       "PRIVATE_ADDRESS": "10.0.0.21", "API_HOST": "10.0.0.5", "ARTIFACT_STORE": "s3://gate/prod",
                       "S3_ENDPOINT_URL": "https://s3.example.net", "AWS_ACCESS_KEY_ID": "id",
                       "AWS_SECRET_ACCESS_KEY": "secret-s3"}


def interpolate(value, variables=OPERATOR_VARIABLES):
    """``${NAME}``, ``${NAME:?message}`` and ``${NAME:-default}`` as compose resolves them."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: variables[m.group(1)], value)
    return value


def load_compose(path: Path, variables: dict[str, str]) -> dict:
    """A compose file with its variables set; each variable it names must be required, none defaulted."""
    text = path.read_text()
    assert set(_VARIABLE.findall(text)) <= set(variables), set(_VARIABLE.findall(text)) - set(variables)
    assert all(":?" in m.group(0) for m in _VARIABLE.finditer(text)), "secrets must be required, not defaulted"
    return interpolate(yaml.safe_load(text), variables)


@pytest.fixture(scope="module")
def compose() -> dict:
    assert set(_VARIABLE.findall((DEPLOY / "compose.yaml").read_text())) == set(OPERATOR_VARIABLES)
    return load_compose(DEPLOY / "compose.yaml", OPERATOR_VARIABLES)


@pytest.fixture(scope="module")
def api_host() -> dict:
    return load_compose(MULTIHOST / "api.compose.yaml", MULTIHOST_VARIABLES)


@pytest.fixture(scope="module")
def gpu_host() -> dict:
    return load_compose(MULTIHOST / "worker.compose.yaml", MULTIHOST_VARIABLES)


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


def built_images(compose: dict, folder: Path = DEPLOY) -> dict[str, dict]:
    """The ftgate images a compose file in ``folder`` builds, each checked: every service's image is pinned,
    ftgate's build from the Dockerfile with arguments it declares, one way per image tag."""
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
        assert (folder / build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]).is_file()
        assert set(build["args"]) <= args, (name, set(build["args"]) - args)
        variant = build["args"]["VARIANT"]
        assert f"torch-{variant}" in stages and image == f"ftgate:{variant}", (name, variant, image)
        assert built.setdefault(image, build) == build, f"{image} is built two different ways"
    return built


def test_every_service_has_a_pinned_image_and_ftgate_images_build_from_the_dockerfile(compose):
    assert set(built_images(compose)) == {"ftgate:cpu", "ftgate:gpu"}


def test_redis_persists_every_message_and_never_evicts(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert option(command, "--appendonly") == "yes" and option(command, "--appendfsync") == "everysec"
    assert option(command, "--maxmemory-policy") == "noeviction"
    assert ("redis-data", "/data") in mounts(redis)
    assert compose["x-ftgate-env"]["FTGATE_BROKER_URL"] == "redis://redis:6379/0"


def test_one_gpu_per_worker_and_every_queue_served(compose):
    served_by_gpu_workers(compose)
    assert compose["services"]["reaper"]["command"] == ["reaper"]


def served_by_gpu_workers(compose: dict) -> None:
    """Each worker reserves one NVIDIA GPU of its own, runs one task at a time without a reaper of its own,
    and together they serve every queue."""
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


def test_volumes_are_declared_and_bind_mounts_exist(compose, api_host, gpu_host):
    for folder, each in ((DEPLOY, compose), (MULTIHOST, api_host), (MULTIHOST, gpu_host)):
        declared = set(each["volumes"])
        used = set()
        for name, service in each["services"].items():
            for source, target in mounts(service):
                assert target.startswith("/"), (name, target)
                if source.startswith("."):
                    assert (folder / source).exists(), (name, source)
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
    named = {v for path in DEPLOY.rglob("*") if path.is_file() and not path.is_relative_to(MULTIHOST)
             for v in re.findall(r"FTGATE_\w+", path.read_text())}
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


def test_multihost_images_are_pinned_and_each_host_builds_its_own(api_host, gpu_host):
    assert set(built_images(api_host, MULTIHOST)) == {"ftgate:cpu"}
    assert set(built_images(gpu_host, MULTIHOST)) == {"ftgate:gpu"}


def test_a_gpu_host_serves_every_queue_and_sweeps_its_own_disk(api_host, gpu_host):
    """Each GPU host alone serves every queue (N hosts are N copies), and runs a reaper for its own render cache
    and scratch, which no other host's reaper sees; the API host's reaper has no GPU."""
    served_by_gpu_workers(gpu_host)
    for host in (api_host, gpu_host):
        assert host["services"]["reaper"]["command"] == ["reaper"] and "deploy" not in host["services"]["reaper"]
    assert not workers(api_host) and "api" not in gpu_host["services"]
    assert {"redis", "postgres", "api", "prometheus"} <= set(api_host["services"])


def test_multihost_settings_are_valid_and_every_host_reaches_the_same_database_broker_and_bucket(
        api_host, gpu_host, tmp_path):
    seen = []
    for host in (api_host, gpu_host):
        ftgate = ftgate_services(host)
        for name, service in ftgate.items():
            env = service["environment"]
            assert all(key.startswith("FTGATE_") or key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
                       for key in env), (name, sorted(env))
            settings = load_settings(env={**env, "HOME": str(tmp_path)})
            assert settings.artifact_store == MULTIHOST_VARIABLES["ARTIFACT_STORE"], name  # never the folder store
            assert settings.s3_endpoint_url == MULTIHOST_VARIABLES["S3_ENDPOINT_URL"]
            assert "FTGATE_ARTIFACTS_DIR" not in env
            for source, target in mounts(service):
                assert not settings.metrics_dir.is_relative_to(target), f"{name}: metrics folder on {source}"
            assert settings.state_dir in {Path(target) for _, target in mounts(service)}, name
            seen.append((settings.database_url.rpartition("@")[0], settings.database_url.rpartition("/")[2],
                         settings.broker_url.rpartition("@")[0], settings.broker_url.rpartition("/")[2]))
        named = {v for path in MULTIHOST.rglob("*") if path.is_file() for v in re.findall(r"FTGATE_\w+",
                                                                                          path.read_text())}
        scripts = {v for path in DEPLOY.glob("*.sh") for v in re.findall(r"FTGATE_\w+", path.read_text())}
        assert named | scripts <= set(host["x-ftgate-env"]), (named | scripts) - set(host["x-ftgate-env"])
    assert len(set(seen)) == 1, seen  # same credentials, database and Redis database everywhere
    api_env, gpu_env = api_host["x-ftgate-env"], gpu_host["x-ftgate-env"]
    assert "@postgres:5432/" in api_env["FTGATE_DATABASE_URL"] and "@redis:6379/" in api_env["FTGATE_BROKER_URL"]
    api_address = MULTIHOST_VARIABLES["API_HOST"]
    assert f"@{api_address}:5432/" in gpu_env["FTGATE_DATABASE_URL"]
    assert f"@{api_address}:6379/" in gpu_env["FTGATE_BROKER_URL"]
    for service, port in (("postgres", 5432), ("redis", 6379)):  # published on the private address only
        assert api_host["services"][service]["ports"] == [f"{MULTIHOST_VARIABLES['PRIVATE_ADDRESS']}:{port}:{port}"]
    redis = api_host["services"]["redis"]["command"]
    assert option(redis, "--requirepass") == MULTIHOST_VARIABLES["REDIS_PASSWORD"]
    assert option(redis, "--maxmemory-policy") == "noeviction" and option(redis, "--appendonly") == "yes"


def test_no_state_volume_is_shared_between_hosts(api_host, gpu_host):
    """Hosts share only the database, the broker and the bucket: every writable volume is a plain local named
    volume (no driver or options that could put it on a network filesystem), and bind mounts are read-only
    configuration from deploy/."""
    for host in (api_host, gpu_host):
        for name, declared in host["volumes"].items():
            assert not declared, f"volume {name} must be local to its host, not {declared}"
        for name, service in host["services"].items():
            for entry in service.get("volumes", []):
                source, target, *mode = entry.split(":")
                if source.startswith("."):
                    assert mode == ["ro"], (name, entry)
    assert ("models", "/models") in mounts(gpu_host["services"]["worker-audit"])
    assert all(entry.endswith(":ro") for entry in gpu_host["services"]["worker-audit"]["volumes"]
               if entry.startswith("models:"))


def test_multihost_healthchecks_gate_the_api_host_and_workers_wait_for_the_schema(api_host, gpu_host):
    everything = api_host["services"]
    for name in ("redis", "postgres", "api", "prometheus"):
        assert everything[name]["healthcheck"]["test"][0] == "CMD", name
    for name, service in everything.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy" and "healthcheck" in everything[dependency], (name, dependency)
    assert MULTIHOST_VARIABLES["REDIS_PASSWORD"] in everything["redis"]["healthcheck"]["test"]
    for name, worker in workers(gpu_host).items():  # the API is on another host: the start script waits for it
        assert worker["entrypoint"] == [f"{IMAGE_DIR}/deploy/start-worker.sh"] and "depends_on" not in worker, name


def test_multihost_prometheus_scrapes_the_api_and_the_workers_each_gpu_host_publishes(api_host, gpu_host):
    config = yaml.safe_load((MULTIHOST / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) >= {"ftgate-api", "ftgate-workers"}  # the names deploy/alerts.yml's up{} rules use
    port = option(api_host["services"]["api"]["command"], "--bind").rpartition(":")[2]
    assert {t for sc in jobs["ftgate-api"]["static_configs"] for t in sc["targets"]} == {f"api:{port}"}
    (secret,) = api_host["services"]["prometheus"]["secrets"]
    assert jobs["ftgate-api"]["authorization"]["credentials_file"] == f"/run/secrets/{secret}"
    assert api_host["secrets"][secret] == {"environment": "METRICS_API_KEY"}
    prometheus = mounts(api_host["services"]["prometheus"])
    (files,) = [sd["files"] for sd in jobs["ftgate-workers"]["file_sd_configs"]]
    assert [("./workers.yml", path) for path in files] == [m for m in prometheus if m[0] == "./workers.yml"]
    assert ("../alerts.yml", config["rule_files"][0]) in prometheus
    published = set()
    for name, worker in workers(gpu_host).items():
        assert option(worker["command"], "--metrics-host") == "0.0.0.0", name
        (entry,) = worker["ports"]
        address, host_port, container_port = entry.split(":")
        assert address == MULTIHOST_VARIABLES["PRIVATE_ADDRESS"] and container_port == option(
            worker["command"], "--metrics-port"), name
        published.add(host_port)
    for group in yaml.safe_load((MULTIHOST / "workers.yml").read_text()):
        assert {t.rpartition(":")[2] for t in group["targets"]} == published, group
