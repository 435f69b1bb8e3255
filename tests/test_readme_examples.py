"""Every shell and Python example in README.md runs as written, on a tiny budget, so none of them can rot.

Shell lines run in order in one scratch directory (later lines use the runs earlier ones made, as a reader's would),
with a tiny training budget appended to the commands that train. The lines listed in NOT_RUN are the exceptions,
each covered elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Line prefix -> why it is not run here.
NOT_RUN = {
    "make ": "`make run` trains for minutes and `make test` is this suite",
    "torchrun ": "multi-process training runs in tests/test_distributed.py",
    "titans bench": "benchmarks take minutes; tests/test_benchmarks.py runs their quick modes",
    "titans compare": "five trainings in two processes (~20 s); tests/test_cli.py runs compare, alone and --jobs 2",
    "source ": "activating .venv: this test already runs the environment's python",
}
# Appended to every command that trains: two steps on a few examples, every step evaluated.
TINY_BUDGET = [
    "training.max_steps=2",
    "training.eval_every=1",
    "training.warmup_steps=1",
    "training.batch_size=4",
    "data.num_samples=40",
    "training.threads=1",
]
TRAINS = ("main.py", "train", "compare")


def code_blocks(language: str) -> list[str]:
    """The README's fenced code blocks in `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shell_commands() -> list[str]:
    """Every command line of the README's bash blocks (continuations joined, comment-only lines dropped)."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def argv_of(command: str) -> list[str]:
    """The argv a reader's shell would run, with `titans` as `python -m titans` and the tiny budget added."""
    words = shlex.split(command, comments=True)
    trains = any(word in TRAINS for word in words[:2])
    if words[0] == "titans":
        words = [sys.executable, "-m", "titans", *words[1:]]
    elif words[:2] == ["python", "main.py"]:
        words = [sys.executable, str(ROOT / "main.py"), *words[2:]]
    return [*words, *TINY_BUDGET] if trains else words


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    shutil.copy(ROOT / "config.yaml", work / "config.yaml")
    shutil.copytree(ROOT / "configs", work / "configs")
    return work


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_the_readme_has_examples_to_run() -> None:
    # The parser below finds the blocks: a README rewrite that broke the fences would otherwise pass vacuously.
    commands = shell_commands()
    assert any(c.startswith("python main.py") for c in commands)
    assert any(c.startswith("titans generate") for c in commands)
    assert len(code_blocks("python")) >= 2


def test_every_readme_shell_example_runs_as_written(workdir: Path) -> None:
    ran = []
    for command in shell_commands():
        if any(command.startswith(prefix) for prefix in NOT_RUN):
            continue
        proc = subprocess.run(argv_of(command), cwd=workdir, capture_output=True, text=True, timeout=600, env=_env())
        context = f"README example failed: {command}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr}"
        assert proc.returncode == 0, context
        assert "Traceback" not in proc.stderr, context
        json.loads(proc.stdout.strip().splitlines()[-1])  # every command ends with one JSON line
        ran.append(command)
    assert len(ran) >= 8, ran


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_every_readme_python_example_runs_as_written(index: int, workdir: Path) -> None:
    source = code_blocks("python")[index]
    proc = subprocess.run([sys.executable, "-c", source], cwd=workdir, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, f"README python example {index} failed:\n{source}\n{proc.stderr}"
