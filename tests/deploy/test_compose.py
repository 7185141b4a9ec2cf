"""`docker compose config` on every compose variant, and what each variant must contain.

Variants: GPU (docker-compose.yml) and CPU (+ compose.cpu.yml), each alone and with the
`replicas` profile. `config` resolves variables, merges files and validates against the compose
schema; it needs the compose CLI plugin only, no running engine.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.deploy.conftest import ROOT

GPU = ["docker-compose.yml"]
CPU = ["docker-compose.yml", "compose.cpu.yml"]
VARIANTS = {
    "gpu": (GPU, []),
    "gpu-replicas": (GPU, ["replicas"]),
    "cpu": (CPU, []),
    "cpu-replicas": (CPU, ["replicas"]),
}


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that would change what compose resolves."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHATGLM_", "COMPOSE_", "BASE_IMAGE", "BUILDER_IMAGE", "TORCH_"))
        and k not in ("WHEELS_IMAGE", "NGINX_IMAGE", "PIP_CA_BUNDLE")
    }
    env.update(extra)
    return env


def compose_config(cmd, files, profiles, env=None) -> dict:
    args = [*cmd, "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(ROOT / f)]
    for p in profiles:
        args += ["--profile", p]
    r = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, docker_compose):
    files, profiles = VARIANTS[request.param]
    return request.param, compose_config(docker_compose, files, profiles)


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_services_of_each_variant(variant):
    name, cfg = variant
    services = set(cfg["services"])
    if name.endswith("replicas"):
        assert services == {"chatglm", "replica-1", "nginx"}
    else:
        assert services == {"chatglm"}


def test_daemon_service(variant):
    name, cfg = variant
    replicas = [s for s in ("chatglm", "replica-1") if s in cfg["services"]]
    for svc_name in replicas:
        svc = cfg["services"][svc_name]
        # the model directory: read-only
        models = [v for v in svc["volumes"] if v["target"] == "/models"]
        assert len(models) == 1 and models[0]["read_only"] is True
        # settings by environment, passed on only when set (null = not forced on the container)
        for key in ("CHATGLM_MODEL", "CHATGLM_SERVED_MODEL_NAME", "CHATGLM_QUANTIZE"):
            assert key in svc["environment"] and svc["environment"][key] is None
        assert "CHATGLM_API_KEYS" in svc["environment"]
        assert svc["restart"] == "unless-stopped"
        assert "/health" in " ".join(svc["healthcheck"]["test"])
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]
        # nginx finds every replica by this network alias
        assert "chatglm-replicas" in svc["networks"]["default"]["aliases"]
        assert svc["build"]["secrets"] == [{"source": "ca"}]
        devices = gpu_devices(svc)
        if name.startswith("gpu"):
            assert len(devices) == 1 and devices[0]["driver"] == "nvidia"
            assert devices[0]["capabilities"] == ["gpu"]
        else:
            assert devices == [], f"{svc_name} reserves a GPU in the CPU variant"
    # only the first replica publishes the daemon's port; the others are reached through nginx
    assert [p["target"] for p in cfg["services"]["chatglm"]["ports"]] == [8000]
    if "replica-1" in cfg["services"]:
        assert not cfg["services"]["replica-1"].get("ports")


def test_cpu_variant_builds_on_a_cpu_base(docker_compose):
    cfg = compose_config(docker_compose, CPU, [])
    args = cfg["services"]["chatglm"]["build"]["args"]
    assert "cuda" not in args["BASE_IMAGE"] and "cuda" not in args["BUILDER_IMAGE"]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert cfg["services"]["chatglm"]["image"].endswith("-cpu")
    gpu = compose_config(docker_compose, GPU, [])["services"]["chatglm"]["build"]["args"]
    assert "cuda" in gpu["BASE_IMAGE"] and "devel" in gpu["BUILDER_IMAGE"]


def test_each_gpu_replica_reserves_its_own_gpu(docker_compose):
    # Docker hands every copy of one scaled service the same GPU, hence one service per GPU.
    cfg = compose_config(docker_compose, GPU, ["replicas"])
    ids = [gpu_devices(cfg["services"][s])[0]["device_ids"] for s in ("chatglm", "replica-1")]
    assert ids == [["0"], ["1"]]
    env = clean_env(CHATGLM_GPU="2", CHATGLM_REPLICA_1_GPU="3")
    cfg = compose_config(docker_compose, GPU, ["replicas"], env)
    ids = [gpu_devices(cfg["services"][s])[0]["device_ids"] for s in ("chatglm", "replica-1")]
    assert ids == [["2"], ["3"]]


def test_nginx_in_front_of_the_replicas(docker_compose):
    cfg = compose_config(docker_compose, CPU, ["replicas"])
    nginx = cfg["services"]["nginx"]
    image = nginx["image"]
    assert ":" in image and not image.endswith(":latest")
    conf = [v for v in nginx["volumes"] if v["target"] == "/etc/nginx/conf.d/default.conf"]
    assert (
        conf and conf[0]["source"] == str(ROOT / "deploy" / "nginx.conf") and conf[0]["read_only"]
    )
    assert {k: v["condition"] for k, v in nginx["depends_on"].items()} == {
        "chatglm": "service_healthy",
        "replica-1": "service_healthy",
    }
    assert [p["target"] for p in nginx["ports"]] == [8080]


def test_settings_from_the_environment_reach_the_service(docker_compose, tmp_path):
    env = clean_env(
        CHATGLM_MODEL="/models/chatglm2-6b",
        CHATGLM_QUANTIZE="4",
        CHATGLM_API_KEYS="k1,k2",
        CHATGLM_MODEL_DIR=str(tmp_path),
        CHATGLM_PUBLISH="127.0.0.1:9000",
    )
    svc = compose_config(docker_compose, CPU, [], env)["services"]["chatglm"]
    assert svc["environment"]["CHATGLM_MODEL"] == "/models/chatglm2-6b"
    assert svc["environment"]["CHATGLM_QUANTIZE"] == "4"
    assert svc["environment"]["CHATGLM_API_KEYS"] == "k1,k2"
    assert [v["source"] for v in svc["volumes"] if v["target"] == "/models"] == [str(tmp_path)]
    assert svc["ports"][0]["host_ip"] == "127.0.0.1" and svc["ports"][0]["published"] == "9000"


def test_ca_bundle_build_secret_is_opt_in(docker_compose, tmp_path):
    assert compose_config(docker_compose, CPU, [])["secrets"]["ca"]["file"] == "/dev/null"
    bundle = tmp_path / "ca.crt"
    bundle.write_text("not a real bundle\n")
    cfg = compose_config(docker_compose, CPU, [], clean_env(PIP_CA_BUNDLE=str(bundle)))
    assert cfg["secrets"]["ca"]["file"] == str(bundle)


def test_nginx_conf_is_streaming_safe():
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    directives = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip().rstrip(";")
        if line and not line.endswith(("{", "}")):
            word, _, rest = line.partition(" ")
            directives.setdefault(word, []).append(rest.strip())
    assert directives["proxy_buffering"] == ["off"]
    assert directives["least_conn"] == [""]
    assert directives["proxy_http_version"] == ["1.1"]
    timeout = directives["proxy_read_timeout"][0]
    assert timeout.endswith("s") and int(timeout[:-1]) >= 600
    assert directives["server"][0].startswith("chatglm-replicas:8000")


def test_next_web_service_is_documented_commented_out():
    text = (ROOT / "docker-compose.yml").read_text()
    block = [line for line in text.splitlines() if line.startswith("  # ")]
    joined = "\n".join(block)
    assert "chatgpt-next-web:" in joined
    assert "BASE_URL: http://chatglm:8000" in joined  # the server root, no /v1
    assert "OPENAI_API_KEY:" in joined
