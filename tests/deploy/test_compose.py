"""deploy/compose: the replicas run as the image expects (read-only, its user, its port), each stops
within its grace period, and nginx and Prometheus name exactly the replicas there are."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.rollout import Nginx, drain_bound_s, find_nginx, free_port, main_config, render_nginx

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose"
DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)")
UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def seconds(duration: str) -> float:
    """A compose duration (``75s``, ``1m15s``) in seconds."""
    parts = DURATION.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * UNITS[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((COMPOSE / "compose.yaml").read_text()))


def replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("image") == "fusionserve:local"}


def dockerfile_env(name: str) -> str:
    found = re.search(rf"\b{name}=(\S+)", (ROOT / "Dockerfile").read_text())
    assert found, f"{name} not set in the Dockerfile"
    return found[1]


def upstreams(compose: dict[str, Any]) -> list[str]:
    port = dockerfile_env("FUSIONSERVE_PORT")
    return [f"{name}:{port}" for name in sorted(replicas(compose))]


def test_three_replicas_behind_nginx_with_prometheus(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"replica-1", "replica-2", "replica-3", "nginx", "prometheus"}
    assert sorted(replicas(compose)) == ["replica-1", "replica-2", "replica-3"]
    nginx = compose["services"]["nginx"]
    assert nginx["depends_on"] == {name: {"condition": "service_healthy"} for name in replicas(compose)}
    assert any(p.endswith(":8080") for p in nginx["ports"])


def test_replicas_run_the_image_read_only_as_its_user(compose: dict[str, Any]) -> None:
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    home = re.search(r"--home-dir (\S+)", (ROOT / "Dockerfile").read_text())
    assert uid and home
    for name, service in replicas(compose).items():
        assert (COMPOSE / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == (
            ROOT / "Dockerfile"
        ), name
        assert service["read_only"] is True, name
        assert str(service["user"]) == uid[1], name
        assert {t.split(":")[0] for t in service["tmpfs"]} == {"/tmp", home[1]}, name
        assert service["healthcheck"]["test"][-1].count("/v2/health/ready") == 1, name


def test_grace_period_covers_the_drain_bound(compose: dict[str, Any]) -> None:
    for name, service in replicas(compose).items():
        env = {k: str(v) for k, v in service["environment"].items()}
        bound = drain_bound_s(env)  # DRAIN_S + DECODE_TIMEOUT_S + REQUEST_TIMEOUT_S + 5 s, as the app computes it
        assert float(env["FUSIONSERVE_DRAIN_S"]) > 0, f"{name}: no drain, nginx would see the listener close at once"
        assert seconds(service["stop_grace_period"]) >= bound, (name, service["stop_grace_period"], bound)


def test_replicas_keep_fixed_distinct_addresses(compose: dict[str, Any]) -> None:
    """nginx resolves the names once: a recreated replica must come back on its address."""
    subnet = compose["networks"]["fusionserve"]["ipam"]["config"][0]["subnet"]
    prefix = subnet.rsplit(".", 1)[0] + "."
    addresses = [s["networks"]["fusionserve"]["ipv4_address"] for s in replicas(compose).values()]
    assert len(set(addresses)) == len(addresses) == 3
    assert all(a.startswith(prefix) for a in addresses), (subnet, addresses)


def test_nginx_config_is_the_shared_template_for_the_replicas(compose: dict[str, Any]) -> None:
    mounts = compose["services"]["nginx"]["volumes"]
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in mounts
    expected = render_nginx(upstreams(compose), "8080", "/dev/stdout")
    assert (COMPOSE / "nginx.conf").read_text() == expected, (
        "deploy/compose/nginx.conf is not deploy/nginx/fusionserve.conf.template rendered for the replicas; "
        "rewrite it with bench.rollout.render_nginx"
    )


def test_prometheus_scrapes_every_replica(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == upstreams(compose)
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["services"]["prometheus"]["volumes"]


def test_nginx_accepts_the_compose_config(compose: dict[str, Any], tmp_path: Path) -> None:
    binary = find_nginx()
    if binary is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx; .ci/run installs it)")
    text = (COMPOSE / "nginx.conf").read_text()
    for name in replicas(compose):  # the names resolve only inside the compose network
        text = text.replace(f"server {name}:", "server 127.0.0.1:")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{free_port()};").replace(
        "/dev/stdout", str(tmp_path / "access.log")
    )
    nginx = Nginx([], binary, folder=tmp_path)
    (tmp_path / "fusionserve.conf").write_text(text)
    (tmp_path / "nginx.conf").write_text(main_config(tmp_path, tmp_path / "fusionserve.conf"))
    done = subprocess.run([*nginx.command(), "-t"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
