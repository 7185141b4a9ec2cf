"""One import package: `chatglm_serve`, and nothing installed under a generic top-level name.

The source folders model/, engine/, server/ and kernels/ sit at the top of the repository but are
subpackages of chatglm_serve. Installed as top-level packages they shadowed other distributions
(transformers imports Hugging Face's `kernels`) and a user's own `model.py`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC = {"model", "engine", "server", "kernels"}


def _python_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / f for f in out if (ROOT / f).is_file()]


def test_no_source_imports_a_generic_top_level_name():
    """A checkout on sys.path makes `import model` resolve (the folders are namespace dirs
    there), so an import that forgot the package would pass in the repo and fail installed."""
    bad = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] in GENERIC
            ]
    assert not bad, bad


def test_source_folders_are_not_top_level_packages():
    """No __init__.py in them: a checkout on sys.path (pytest's rootdir, `python -m` from the
    root) must not turn them into regular top-level packages that win over installed ones."""
    assert [d for d in sorted(GENERIC) if (ROOT / d / "__init__.py").exists()] == []


def test_hugging_face_kernels_is_not_shadowed():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers < 5 does not need it)")
    kernels = importlib.import_module("kernels")  # from the repo root, as transformers does
    assert (
        Path(kernels.__file__)
        .resolve()
        .is_relative_to(Path(importlib.metadata.distribution("kernels").locate_file("")))
    ), kernels.__file__
    assert hasattr(kernels, "CUDAProperties")  # what transformers imports from it


def test_built_wheel_installs_only_chatglm_serve(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("chatglm_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"chatglm_serve", f"chatglm_serve-{wheel.name.split('-')[1]}.dist-info"}, top
    # the subpackages with their code and data, inside the one package
    for must in (
        "chatglm_serve/__init__.py",
        "chatglm_serve/__main__.py",
        "chatglm_serve/engine/llm_engine.py",
        "chatglm_serve/engine/load.py",
        "chatglm_serve/model/chatglm.py",
        "chatglm_serve/model/demo_corpus.txt",
        "chatglm_serve/server/cli.py",
        "chatglm_serve/server/static/index.html",
        "chatglm_serve/server/static/marked.umd.js",  # the page's vendored libraries...
        "chatglm_serve/server/static/purify.min.js",
        "chatglm_serve/server/static/VENDORED.txt",  # ...with their licenses
        "chatglm_serve/server/static/LICENSE.marked.md",
        "chatglm_serve/server/static/LICENSE.dompurify-Apache-2.0.txt",
        "chatglm_serve/server/static/LICENSE.dompurify-MPL-2.0.txt",
        "chatglm_serve/kernels/build.py",
        "chatglm_serve/kernels/csrc/cpu/decode_stack.cpp",
        "chatglm_serve/kernels/csrc/cuda/paged_attention.cu",
    ):
        assert must in names, must
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    )
    assert b"chatglm-serve = chatglm_serve.server.cli:main" in entry_points


def _readme_python_example() -> str:
    """The README's Python API example: its first block importing from chatglm_serve, plus the
    block after it that continues the same session."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    first = next(i for i, b in enumerate(blocks) if b.startswith("from chatglm_serve import"))
    return blocks[first] + blocks[first + 1]


def test_readme_python_example_runs_beside_a_users_own_modules(tmp_path):
    """Run from a folder with the user's own model.py, server.py and kernels/: those are what
    `import model` etc. find there, and the example must not care."""
    from chatglm_serve.model.demo import demo_checkpoint_dir

    (tmp_path / "model.py").write_text("raise ImportError('the user model.py was imported')\n")
    (tmp_path / "server.py").write_text("raise ImportError('the user server.py was imported')\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("raise ImportError('user kernels/')\n")
    code = _readme_python_example()
    assert 'ChatGLM.load("/path/to/chatglm2-6b")' in code
    # a real checkpoint directory in place of the placeholder path; replies kept short
    code = code.replace('"/path/to/chatglm2-6b"', repr(str(demo_checkpoint_dir())))
    code = code.replace("history=[])\n", "history=[], max_length=96)\n", 1)
    code = code.replace(
        'glm.stream_chat("晚上睡不着应该怎么办", history)',
        'glm.stream_chat("晚上睡不着应该怎么办", history, max_length=160)',
    )
    script = tmp_path / "example.py"
    script.write_text(code + "\nprint('EXAMPLE-OK', repr(glm))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    p = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "EXAMPLE-OK ChatGLM(" in p.stdout and "closed)" in p.stdout


def test_python_m_chatglm_serve_from_another_folder(tmp_path):
    (tmp_path / "server.py").write_text("raise ImportError('the user server.py was imported')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    p = subprocess.run(
        [sys.executable, "-m", "chatglm_serve", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "chatglm-serve" in p.stdout or "usage" in p.stdout


def test_importing_the_package_does_not_load_torch():
    """The HTTP side (chatglm_serve.server) holds no tensors: importing it, or the package's
    lazy public names, loads no torch until a model is asked for."""
    code = (
        "import sys, chatglm_serve, chatglm_serve.server.app, chatglm_serve.server.cli\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "from chatglm_serve import ChatGLM, SamplingParams\n"
        "assert 'torch' in sys.modules\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr


def test_public_api_names():
    import chatglm_serve

    assert {"ChatGLM", "SamplingParams", "EngineArgs", "EngineConfig"} <= set(chatglm_serve.__all__)
    assert importlib.util.find_spec("chatglm_serve.server.static") is not None
    with pytest.raises(AttributeError):
        chatglm_serve.no_such_name  # noqa: B018
