"""compose/ and the Dockerfile, checked by reading them (no container engine here).

Each check is a function that returns the problems it finds, so the tests
below can also feed it a broken copy and prove that it would catch the break.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.settings import load_settings
from tests.common.ecs import FIELD_TYPES, load_saved_objects, load_template, template_types

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# The services built from this repo, each scalable on its own: processor and
# metrics by replicas (`--scale`), ingest by worker processes in its container.
HEADWATER = ("ingest", "processor", "metrics")
SCALED_BY_REPLICAS = ("processor", "metrics")
# Settings every service has (services/common/settings.py CommonSettings).
COMMON_SETTINGS = ("KAFKA_BOOTSTRAP", "HTTP_PORT", "LOG_LEVEL", "SHUTDOWN_TIMEOUT_S")
RESTART_POLICIES = {"always", "unless-stopped", "on-failure"}
# Beside the legacy Kinesis path: one console script and one settings prefix, two
# roles (services/bridge/__main__.py), each with its HTTP port setting.
LEGACY_PATH = {
    "bridge": ("HEADWATER_BRIDGE_HTTP_PORT", ["headwater-bridge"]),
    "mirror": ("HEADWATER_BRIDGE_MIRROR_HTTP_PORT", ["headwater-bridge", "mirror"]),
}

Compose = dict[str, Any]


def load_compose() -> Compose:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "no services in compose"
    return data


def console_scripts() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["scripts"])


def as_list(command: Any) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def bind_sources(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume entry of a service."""
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            out.append((str(vol.get("source", "")), str(vol["target"]), bool(vol.get("read_only"))))
        else:
            parts = str(vol).split(":")
            mode = parts[2] if len(parts) > 2 else ""
            out.append((parts[0], parts[1] if len(parts) > 1 else parts[0], "ro" in mode.split(",")))
    return out


def is_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def fixed_host_ports(service: dict[str, Any]) -> list[str]:
    """Host ports that only one container can hold ("8080" alone and ranges are free to scale)."""
    fixed = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            host_port = str(port.get("published", ""))
        else:
            parts = str(port).split(":")
            host_port = parts[-2] if len(parts) > 1 else ""
        if host_port and "-" not in host_port:
            fixed.append(host_port)
    return fixed


def health_port(service: dict[str, Any]) -> int | None:
    found = re.search(r"127\.0\.0\.1:(\d+)|localhost:(\d+)", " ".join(as_list(service["healthcheck"]["test"])))
    return int(found.group(1) or found.group(2)) if found else None


# --- checks -----------------------------------------------------------------


def check_every_service(compose: Compose) -> list[str]:
    problems = []
    services = compose["services"]
    for name, svc in services.items():
        if not (svc.get("build") or svc.get("image")):
            problems.append(f"{name}: neither build nor image")
        hc = svc.get("healthcheck")
        if not hc or hc.get("disable") or not as_list(hc.get("test")) or as_list(hc.get("test"))[0] == "NONE":
            problems.append(f"{name}: no healthcheck")
        if svc.get("restart") not in RESTART_POLICIES:
            problems.append(f"{name}: restart policy {svc.get('restart')!r} not one of {sorted(RESTART_POLICIES)}")
        for dep, condition in depends_on(svc).items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif condition == "service_healthy" and not services[dep].get("healthcheck"):
                problems.append(f"{name}: waits for {dep} to be healthy but {dep} has no healthcheck")
        named = set(compose.get("volumes") or {})
        for source, _, _ in bind_sources(svc):
            if source and not is_path(source) and source not in named:
                problems.append(f"{name}: named volume {source} not declared under volumes")
    return problems


def check_headwater_service(compose: Compose, name: str) -> list[str]:
    svc = compose["services"].get(name)
    if svc is None:
        return [f"{name}: missing"]
    problems = []
    prefix = f"HEADWATER_{name.upper()}_"
    if not svc.get("build"):
        problems.append(f"{name}: not built from the repo")
    if "container_name" in svc:
        problems.append(f"{name}: container_name stops `--scale {name}=N`")
    if name in SCALED_BY_REPLICAS:
        problems += [f"{name}: fixed host port {p} stops a second replica" for p in fixed_host_ports(svc)]
    command = as_list(svc.get("command")) or as_list(svc.get("entrypoint"))
    if command[:1] != [f"headwater-{name}"]:
        problems.append(f"{name}: command {command} does not run headwater-{name}")
    elif command[0] not in console_scripts():
        problems.append(f"{name}: {command[0]} is not a console script in pyproject.toml")
    env = env_of(svc)
    for var in env:
        if not var.startswith(prefix):
            problems.append(f"{name}: {var} lacks the {prefix} prefix")
    problems += [f"{name}: {prefix}{field} not set" for field in COMMON_SETTINGS if prefix + field not in env]
    if depends_on(svc).get("kafka") != "service_healthy":
        problems.append(f"{name}: does not wait for kafka to be healthy")
    http_port = env.get(prefix + "HTTP_PORT")
    if svc.get("healthcheck") and http_port and health_port(svc) != int(http_port):
        problems.append(f"{name}: healthcheck port {health_port(svc)} is not HTTP_PORT {http_port}")
    # The source registry is mounted read-only where SOURCES_FILE points.
    mounts = {target: (source, ro) for source, target, ro in bind_sources(svc)}
    sources_file = env.get(prefix + "SOURCES_FILE")
    if not sources_file:
        problems.append(f"{name}: {prefix}SOURCES_FILE not set")
    else:
        source, ro = mounts.get(sources_file, ("", False))
        if not source.endswith("config/sources.json") or not ro:
            problems.append(f"{name}: config/sources.json not mounted read-only at {sources_file}")
    return problems


def check_ingest_spool(compose: Compose) -> list[str]:
    """The spool survives the container, and no two containers share it.

    Each ingest process spools under <SPOOL_DIR>/worker-<n>, so two replicas on
    one volume would write over each other: ingest scales by WORKERS, and a
    fixed host port makes a second replica fail to start.
    """
    svc = compose["services"]["ingest"]
    env = env_of(svc)
    spool_dir = env.get("HEADWATER_INGEST_SPOOL_DIR")
    problems = []
    if not env.get("HEADWATER_INGEST_WORKERS"):
        problems.append("ingest: HEADWATER_INGEST_WORKERS not set")
    named = [s for s, t, _ in bind_sources(svc) if t == spool_dir and not is_path(s)]
    if not named:
        problems.append(f"ingest: spool dir {spool_dir} is not on a named volume")
    elif not fixed_host_ports(svc):
        problems.append("ingest: replicas could share the spool volume (no fixed host port stops `--scale`)")
    return problems


def check_referenced_files(compose: Compose) -> list[str]:
    """Every repo file compose mounts or builds from exists."""
    problems = []
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            ctx = (COMPOSE_DIR / context).resolve()
            if ctx != ROOT:
                problems.append(f"{name}: build context {context} is not the repo root")
            if not (ctx / dockerfile).is_file():
                problems.append(f"{name}: {ctx / dockerfile} does not exist")
        for source, _, _ in bind_sources(svc):
            if source.startswith("."):
                path = (COMPOSE_DIR / source).resolve()
                if not path.exists():
                    problems.append(f"{name}: mounts {source}, which does not exist")
                elif not path.is_relative_to(ROOT):
                    problems.append(f"{name}: mounts {source}, outside the repo")
    return problems


def check_prometheus(compose: Compose, config: dict[str, Any]) -> list[str]:
    """Each Headwater service is scraped by name, on its HTTP port, or on each worker's metrics port."""
    targets: set[tuple[str, int]] = set()
    problems = []
    for job in config.get("scrape_configs") or []:
        if job.get("metrics_path", "/metrics") != "/metrics":
            problems.append(f"job {job.get('job_name')}: metrics_path is not /metrics")
        for sd in job.get("dns_sd_configs") or []:
            targets |= {(n, int(sd.get("port", 0))) for n in sd.get("names", [])}
        for static in job.get("static_configs") or []:
            for target in static.get("targets", []):
                host, _, host_port = str(target).partition(":")
                targets.add((host, int(host_port or 80)))
    for name in HEADWATER:
        env = env_of(compose["services"].get(name, {}))
        prefix = f"HEADWATER_{name.upper()}_"
        if prefix + "METRICS_PORT" in env:
            # Each worker's own metrics port (through the shared port a scrape reaches any one).
            base = int(env[prefix + "METRICS_PORT"])
            ports = [base + i for i in range(int(env.get(prefix + "WORKERS", "1")))]
        else:
            ports = [int(env.get(prefix + "HTTP_PORT", "0"))]
        problems.extend(f"prometheus does not scrape {name}:{port}" for port in ports if (name, port) not in targets)
    for name, (port_var, _) in LEGACY_PATH.items():
        if name in compose["services"]:
            port = int(env_of(compose["services"][name]).get(port_var, "0"))
            if (name, port) not in targets:
                problems.append(f"prometheus does not scrape {name}:{port}")
    return problems


def check_dockerfile(text: str) -> list[str]:
    problems = []
    lines = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    if not any(i.upper().startswith("FROM ") for i in instructions):
        problems.append("Dockerfile: no FROM")
    if not any(re.match(r"RUN .*pip install (--no-deps )?\.(\s|$)", i) for i in instructions):
        problems.append("Dockerfile: does not pip install the project")
    for inst in instructions:
        if inst.upper().startswith("COPY ") and "--from=" not in inst:
            for src in inst.split()[1:-1]:
                if not src.startswith("--") and not (ROOT / src).exists():
                    problems.append(f"Dockerfile: COPY {src}, which does not exist")
    run = [i for i in instructions if re.match(r"(CMD|ENTRYPOINT) ", i)]
    if not run:
        problems.append("Dockerfile: no CMD or ENTRYPOINT")
    else:
        argv = run[-1].split(" ", 1)[1]
        program = yaml.safe_load(argv)[0] if argv.startswith("[") else argv.split()[0]
        if program not in console_scripts():
            problems.append(f"Dockerfile: runs {program}, not a console script from pyproject.toml")
    return problems


def check_dockerignore(dockerfile: str, ignore: str) -> list[str]:
    """.dockerignore keeps out nothing the Dockerfile copies from the context."""
    ignored = {line.strip().rstrip("/") for line in ignore.splitlines() if line.strip() and line[0] != "#"}
    problems = []
    for match in re.finditer(r"^COPY (?!--from)(.+)$", dockerfile, re.M):
        for src in match.group(1).split()[:-1]:
            top = src.split("/")[0]
            if src in ignored or top in ignored:
                problems.append(f".dockerignore drops {src}, which the Dockerfile copies")
    return problems


def check_legacy_path(compose: Compose) -> list[str]:  # noqa: C901 - one check per rule, in the docstring's order
    """The bridge and the mirror: built from the repo, scalable, on the Kinesis service,
    settings under HEADWATER_BRIDGE_ (AWS credentials come from an env_file, as the
    standard AWS variables), the registry mounted read-only."""
    services = compose["services"]
    problems = []
    kinesis = services.get("kinesis")
    if kinesis is None:
        return ["kinesis: missing"]
    if not [s for s, t, _ in bind_sources(kinesis) if t == "/var/lib/kinesalite" and not is_path(s)]:
        problems.append("kinesis: /var/lib/kinesalite is not on a named volume")
    for name, (port_var, command) in LEGACY_PATH.items():
        svc = services.get(name)
        if svc is None:
            problems.append(f"{name}: missing")
            continue
        if not svc.get("build"):
            problems.append(f"{name}: not built from the repo")
        if "container_name" in svc or fixed_host_ports(svc):
            problems.append(f"{name}: cannot be scaled with --scale")
        if as_list(svc.get("command")) != command:
            problems.append(f"{name}: command {as_list(svc.get('command'))} is not {command}")
        elif command[0] not in console_scripts():
            problems.append(f"{name}: {command[0]} is not a console script in pyproject.toml")
        env = env_of(svc)
        problems += [
            f"{name}: {var} lacks the HEADWATER_BRIDGE_ prefix"
            for var in env
            if not var.startswith("HEADWATER_BRIDGE_")
        ]
        for var in ("HEADWATER_BRIDGE_KAFKA_BOOTSTRAP", "HEADWATER_BRIDGE_SOURCES_FILE", port_var):
            if var not in env:
                problems.append(f"{name}: {var} not set")
        if env.get("HEADWATER_BRIDGE_AWS_ENDPOINT_URL") != "http://kinesis:4567":
            problems.append(f"{name}: not pointed at the kinesis service")
        if depends_on(svc).get("kinesis") != "service_healthy" or depends_on(svc).get("kafka") != "service_healthy":
            problems.append(f"{name}: does not wait for kafka and kinesis to be healthy")
        if env.get(port_var) and svc.get("healthcheck") and health_port(svc) != int(env[port_var]):
            problems.append(f"{name}: healthcheck port {health_port(svc)} is not {port_var}")
        mounts = {target: (source, ro) for source, target, ro in bind_sources(svc)}
        source, ro = mounts.get(env.get("HEADWATER_BRIDGE_SOURCES_FILE", ""), ("", False))
        if not source.endswith("config/sources.json") or not ro:
            problems.append(f"{name}: config/sources.json not mounted read-only")
        for env_file in svc.get("env_file") or []:
            if not (COMPOSE_DIR / str(env_file)).is_file():
                problems.append(f"{name}: env_file {env_file} does not exist")
    if depends_on(services.get("bridge", {})).get("cassandra") != "service_healthy":
        problems.append("bridge: does not wait for cassandra (its leases and checkpoints) to be healthy")
    return problems


# --- tests ------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Compose:
    return load_compose()


def test_every_service_has_image_healthcheck_restart(compose: Compose) -> None:
    assert check_every_service(compose) == []


@pytest.mark.parametrize("name", HEADWATER)
def test_headwater_service(compose: Compose, name: str) -> None:
    assert check_headwater_service(compose, name) == []


def test_infrastructure_services(compose: Compose) -> None:
    services = compose["services"]
    for name in ("kafka", "cassandra", "elasticsearch", "kibana", "filebeat", "prometheus", "grafana"):
        assert name in services, name
    kafka = env_of(services["kafka"])
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for var in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR",
    ):
        assert kafka[var] == "1", var
    assert kafka["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert "kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert services["cassandra"]["image"].startswith("cassandra:5.0")
    assert "cqlsh" in as_list(services["cassandra"]["healthcheck"]["test"])
    assert depends_on(services["metrics"]).get("cassandra") == "service_healthy"
    # Data that must survive a container being recreated lives in named volumes.
    for name, target in (
        ("kafka", "/var/lib/kafka/data"),
        ("cassandra", "/var/lib/cassandra"),
        ("elasticsearch", "/usr/share/elasticsearch/data"),
    ):
        named = [s for s, t, _ in bind_sources(services[name]) if t == target and not is_path(s)]
        assert named, f"{name}: {target} is not on a named volume"
    if "KAFKA_LOG_DIRS" in kafka:
        assert kafka["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"


def test_legacy_path_services(compose: Compose, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_legacy_path(compose) == []
    from services.bridge.settings import Settings

    for name in LEGACY_PATH:
        for var in list(os.environ):
            if var.startswith("HEADWATER_BRIDGE_"):
                monkeypatch.delenv(var)
        for var, value in env_of(compose["services"][name]).items():
            monkeypatch.setenv(var, value)
        settings = load_settings(Settings)
        assert settings.kafka_bootstrap == "kafka:9092" and settings.aws_endpoint_url == "http://kinesis:4567"


def test_checks_catch_a_misconfigured_legacy_path(compose: Compose) -> None:
    def change(services: dict[str, Any]) -> None:
        services["mirror"]["environment"].pop("HEADWATER_BRIDGE_AWS_ENDPOINT_URL")
        services["mirror"]["environment"]["AWS_ACCESS_KEY_ID"] = "x"
        services["bridge"]["ports"] = ["8085:8080"]
        services["bridge"]["depends_on"].pop("cassandra")

    problems = check_legacy_path(broken(compose, change))
    assert set(problems) >= {
        "mirror: not pointed at the kinesis service",
        "mirror: AWS_ACCESS_KEY_ID lacks the HEADWATER_BRIDGE_ prefix",
        "bridge: cannot be scaled with --scale",
        "bridge: does not wait for cassandra (its leases and checkpoints) to be healthy",
    }


def test_ingest_spool_is_durable_and_not_shared(compose: Compose) -> None:
    assert check_ingest_spool(compose) == []


def test_referenced_files_exist(compose: Compose) -> None:
    assert check_referenced_files(compose) == []


def test_prometheus_scrapes_the_services(compose: Compose) -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    assert check_prometheus(compose, config) == []


def test_grafana_datasources(compose: Compose) -> None:
    provisioning = [t for s, t, _ in bind_sources(compose["services"]["grafana"]) if s.endswith("provisioning")]
    assert provisioning == ["/etc/grafana/provisioning"]
    sources = yaml.safe_load(
        (COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text()
    )["datasources"]
    by_type = {s["type"]: s for s in sources}
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"
    port = env_of(compose["services"]["metrics"])["HEADWATER_METRICS_HTTP_PORT"]
    assert by_type["grafana-kairosdb-datasource"]["url"] == f"http://metrics:{port}"
    assert "grafana-kairosdb-datasource" in env_of(compose["services"]["grafana"])["GF_INSTALL_PLUGINS"]


def test_filebeat_decodes_service_json_into_elasticsearch(compose: Compose) -> None:
    config = yaml.safe_load((COMPOSE_DIR / "filebeat" / "filebeat.yml").read_text())
    assert config["output.elasticsearch"]["hosts"] == ["http://elasticsearch:9200"]
    templates = config["filebeat.autodiscover"]["providers"][0]["templates"]
    wanted = {
        cond["equals"]["docker.container.labels.com_docker_compose_service"]
        for t in templates
        for cond in t["condition"]["or"]
    }
    assert wanted == set(HEADWATER) | set(LEGACY_PATH)
    parsers = [p for t in templates for inp in t["config"] for p in inp["parsers"]]
    assert [next(iter(p)) for p in parsers] == ["container", "ndjson"]
    mounts = {t for _, t, _ in bind_sources(compose["services"]["filebeat"])}
    assert {"/usr/share/filebeat/filebeat.yml", "/var/lib/docker/containers"} <= mounts


# Every service's service.name, as its log lines carry it (the mirror is the bridge's second role).
LOG_SERVICES = {*HEADWATER, "bridge", "bridge-mirror"}


def check_log_template(compose: Compose, filebeat: dict[str, Any], template: dict[str, Any]) -> list[str]:
    """Filebeat loads our index template (mounted where it looks) and writes where the template applies."""
    problems = []
    mounts = {t: s for s, t, _ in bind_sources(compose["services"]["filebeat"])}
    path = filebeat.get("setup.template.json.path")
    wanted = "./filebeat/headwater-logs.template.json"
    if not filebeat.get("setup.template.json.enabled") or mounts.get(str(path)) != wanted:
        problems.append(f"filebeat: the index template is not mounted at setup.template.json.path ({path})")
    if filebeat.get("setup.template.json.name") != filebeat.get("setup.template.name"):
        problems.append("filebeat: setup.template.json.name is not setup.template.name")
    if bool(filebeat.get("setup.template.json.data_stream")) != ("data_stream" in template):
        problems.append("filebeat: setup.template.json.data_stream does not say what the template is")
    index = str(filebeat["output.elasticsearch"].get("index", ""))
    if not any(fnmatch.fnmatch(index, p) for p in template["index_patterns"]):
        problems.append(f"filebeat: writes to {index!r}, which the template's patterns do not match")
    mapped = template_types(template)
    problems += [
        f"template: {f} is {mapped.get(f)}, ECS says {kind}" for f, kind in FIELD_TYPES.items() if mapped.get(f) != kind
    ]
    return problems


def check_saved_searches(
    objects: list[dict[str, Any]], filebeat: dict[str, Any], template: dict[str, Any]
) -> list[str]:
    """One saved search per service on the data view of Filebeat's index, over mapped fields."""
    problems = []
    views = {o["id"]: o for o in objects if o["type"] == "index-pattern"}
    index = str(filebeat["output.elasticsearch"].get("index", ""))
    for view in views.values():
        if not fnmatch.fnmatch(index, view["attributes"]["title"]):
            problems.append(f"data view {view['attributes']['title']} does not match Filebeat's index {index}")
    mapped = set(template_types(template)) | set(FIELD_TYPES)
    services = set()
    for obj in (o for o in objects if o["type"] == "search"):
        refs = {r["id"] for r in obj["references"] if r["type"] == "index-pattern"}
        if not refs or not refs <= set(views):
            problems.append(f"{obj['id']}: refers to no data view in the file")
        source = json.loads(obj["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
        services |= set(re.findall(r'service\.name:"([^"]+)"', source["query"]["query"]))
        problems += [
            f"{obj['id']}: column {c} is not a mapped field" for c in obj["attributes"]["columns"] if c not in mapped
        ]
    problems += [f"no saved search for {name}" for name in sorted(LOG_SERVICES - services)]
    return problems


def test_filebeat_loads_the_ecs_index_template(compose: Compose) -> None:
    filebeat = yaml.safe_load((COMPOSE_DIR / "filebeat" / "filebeat.yml").read_text())
    assert filebeat["setup.ilm.enabled"] is False
    assert check_log_template(compose, filebeat, load_template()) == []
    broken_template = load_template()
    broken_template["index_patterns"] = ["logs-*"]
    broken_template["template"]["mappings"]["properties"]["kafka"]["properties"]["partition"]["type"] = "keyword"
    assert check_log_template(
        compose, {**filebeat, "setup.template.json.path": "/elsewhere.json"}, broken_template
    ) == [
        "filebeat: the index template is not mounted at setup.template.json.path (/elsewhere.json)",
        "filebeat: writes to 'headwater-logs-default', which the template's patterns do not match",
        "template: kafka.partition is keyword, ECS says long",
    ]


def test_kibana_saved_searches_cover_every_service(compose: Compose) -> None:
    filebeat = yaml.safe_load((COMPOSE_DIR / "filebeat" / "filebeat.yml").read_text())
    objects = load_saved_objects()
    assert check_saved_searches(objects, filebeat, load_template()) == []
    without_metrics = [copy.deepcopy(o) for o in objects if o["id"] != "headwater-logs-metrics"]
    without_metrics[1]["attributes"]["columns"].append("no.such.field")
    without_metrics[1]["references"] = []
    problems = check_saved_searches(without_metrics, filebeat, load_template())
    assert problems == [
        f"{without_metrics[1]['id']}: refers to no data view in the file",
        f"{without_metrics[1]['id']}: column no.such.field is not a mapped field",
        "no saved search for metrics",
    ]


def test_dockerfile_installs_project_and_runs_a_console_script() -> None:
    assert check_dockerfile(DOCKERFILE.read_text()) == []


def test_dockerignore_keeps_what_the_image_needs() -> None:
    assert check_dockerignore(DOCKERFILE.read_text(), (ROOT / ".dockerignore").read_text()) == []


@pytest.mark.parametrize("name", HEADWATER)
def test_compose_settings_are_fields_of_the_service_settings(
    compose: Compose, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a service has its Settings class, every variable compose sets names one of its fields."""
    module_name = f"services.{name}.settings"
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} not written yet")
    settings_cls = importlib.import_module(module_name).Settings
    prefix = f"HEADWATER_{name.upper()}_"
    assert str(settings_cls.model_config.get("env_prefix", "")).upper() == prefix
    env = env_of(compose["services"][name])
    unknown = [v for v in env if v[len(prefix) :].lower() not in settings_cls.model_fields]
    assert unknown == []
    # The values parse too (a list setting wants JSON, a port an int, ...).
    for var in list(os.environ):
        if var.startswith(prefix):
            monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    settings = load_settings(settings_cls)
    assert settings.kafka_bootstrap == "kafka:9092"


# --- the checks catch what they are meant to catch ---------------------------


def broken(compose: Compose, change: Any) -> Compose:
    copied = copy.deepcopy(compose)
    change(copied["services"])
    return copied


def test_checks_catch_a_missing_healthcheck(compose: Compose) -> None:
    bad = broken(compose, lambda s: s["processor"].pop("healthcheck"))
    assert "processor: no healthcheck" in check_every_service(bad)
    bad = broken(compose, lambda s: s["kafka"]["healthcheck"].update(disable=True))
    assert "kafka: no healthcheck" in check_every_service(bad)


def test_checks_catch_missing_image_restart_and_undeclared_volume(compose: Compose) -> None:
    def change(services: dict[str, Any]) -> None:
        services["grafana"].pop("image")
        services["cassandra"].pop("restart")
        services["kafka"]["volumes"] = ["kafka-logs:/var/lib/kafka/data"]

    problems = check_every_service(broken(compose, change))
    assert "grafana: neither build nor image" in problems
    assert any(p.startswith("cassandra: restart policy") for p in problems)
    assert "kafka: named volume kafka-logs not declared under volumes" in problems


def test_checks_catch_unscalable_or_misconfigured_service(compose: Compose) -> None:
    def change(services: dict[str, Any]) -> None:
        svc = services["processor"]
        svc["container_name"] = "processor"
        svc["ports"] = ["8081:8080"]
        svc["command"] = ["headwater-processer"]
        svc["environment"].pop("HEADWATER_PROCESSOR_KAFKA_BOOTSTRAP")
        svc["environment"]["KAFKA_BOOTSTRAP"] = "kafka:9092"
        svc["depends_on"] = ["kafka"]
        svc.pop("build")

    problems = check_headwater_service(broken(compose, change), "processor")
    assert set(problems) >= {
        "processor: not built from the repo",
        "processor: container_name stops `--scale processor=N`",
        "processor: fixed host port 8081 stops a second replica",
        "processor: command ['headwater-processer'] does not run headwater-processor",
        "processor: KAFKA_BOOTSTRAP lacks the HEADWATER_PROCESSOR_ prefix",
        "processor: HEADWATER_PROCESSOR_KAFKA_BOOTSTRAP not set",
        "processor: does not wait for kafka to be healthy",
    }


def test_checks_catch_a_shared_or_lost_spool(compose: Compose) -> None:
    bad = broken(compose, lambda s: s["ingest"].update(ports=["8080-8089:8080"]))
    assert check_ingest_spool(bad) == [
        "ingest: replicas could share the spool volume (no fixed host port stops `--scale`)"
    ]
    sources_only = ["../config/sources.json:/etc/headwater/sources.json:ro"]
    bad = broken(compose, lambda s: s["ingest"].update(volumes=sources_only))
    assert check_ingest_spool(bad) == ["ingest: spool dir /var/lib/headwater/spool is not on a named volume"]


def test_checks_catch_missing_files_and_scrape_targets(compose: Compose) -> None:
    def change(services: dict[str, Any]) -> None:
        services["prometheus"]["volumes"] = ["./prometheus/missing.yml:/etc/prometheus/prometheus.yml:ro"]
        services["ingest"]["build"] = {"context": "..", "dockerfile": "Dockerfile.missing"}

    problems = check_referenced_files(broken(compose, change))
    assert any("missing.yml" in p for p in problems)
    assert any("Dockerfile.missing" in p for p in problems)
    # Ingest on its shared port and one worker's metrics port only: the second worker is missed.
    config = {
        "scrape_configs": [
            {
                "job_name": "x",
                "dns_sd_configs": [{"names": ["ingest"], "port": 8080}, {"names": ["ingest"], "port": 9400}],
            }
        ]
    }
    assert check_prometheus(compose, config) == [
        "prometheus does not scrape ingest:9401",
        "prometheus does not scrape processor:8080",
        "prometheus does not scrape metrics:8080",
        "prometheus does not scrape bridge:8080",
        "prometheus does not scrape mirror:8080",
    ]


def test_checks_catch_a_broken_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert any(
        "not a console script" in p
        for p in check_dockerfile(re.sub(r"^CMD .*$", 'CMD ["headwater-nope"]', text, flags=re.M))
    )
    assert "Dockerfile: does not pip install the project" in check_dockerfile(
        re.sub(r"pip install (--no-deps )?\.", "true", text)
    )
    assert check_dockerignore(text, "services\n") == [".dockerignore drops services, which the Dockerfile copies"]
