"""Process-level settings (titans/system.py): switching the whole process to another malloc (`--allocator`).

The switch re-executes the command with the library in LD_PRELOAD. The re-exec test builds a stand-in library
(an empty shared object) with the C compiler, so it runs wherever the compiled-code tests run, jemalloc installed or
not; one more test runs the real jemalloc where it is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from titans import cli, system
from titans.system import AllocatorError, allocator_env, cpu_compiler, find_allocator, loaded_allocator

ROOT = Path(__file__).resolve().parent.parent


def fake_allocator(monkeypatch, directory: Path, filename: str = "libstandin.so") -> None:
    """Make "jemalloc" mean `directory/filename` (which may not exist) for this process."""
    monkeypatch.setattr(system, "ALLOCATOR_LIBRARIES", {"jemalloc": (filename,)})
    monkeypatch.setattr(system, "_library_dirs", lambda: [directory])


def test_unknown_and_missing_allocators_are_errors_that_name_the_fix(tmp_path, monkeypatch) -> None:
    with pytest.raises(AllocatorError, match="unknown allocator 'hoard'; choose one of system, jemalloc, tcmalloc"):
        find_allocator("hoard")
    fake_allocator(monkeypatch, tmp_path)
    assert find_allocator("jemalloc") is None
    with pytest.raises(AllocatorError, match="libstandin.so found in .*install it .*apt install libjemalloc2"):
        allocator_env("jemalloc", {})
    assert allocator_env("system", {"A": "1"}) == {"A": "1"}  # nothing preloaded for the C library's malloc


def test_allocator_env_puts_the_library_first_and_keeps_other_preloads(tmp_path, monkeypatch) -> None:
    (tmp_path / "libstandin.so").write_bytes(b"")
    fake_allocator(monkeypatch, tmp_path)
    path = str(tmp_path / "libstandin.so")
    env = allocator_env("jemalloc", {"LD_PRELOAD": f"libother.so:{path}", "KEEP": "x"})
    assert env == {"LD_PRELOAD": f"{path} libother.so", "KEEP": "x"}  # listed once, first
    assert loaded_allocator() == "system"  # not loaded into this process by naming it


def test_cli_refuses_to_switch_a_process_it_does_not_own_and_a_missing_library(tmp_path, monkeypatch, capsys) -> None:
    """main() called from Python (not the process's command line) cannot re-execute: exit 2, one line, the fix."""
    (tmp_path / "libstandin.so").write_bytes(b"")
    fake_allocator(monkeypatch, tmp_path)
    assert cli.main(["train", "--allocator", "jemalloc", "training.max_steps=1"]) == 2
    assert "must be loaded when the process starts" in capsys.readouterr().err
    fake_allocator(monkeypatch, tmp_path, "libmissing.so")
    assert cli.main(["memory-check", "--allocator", "jemalloc", "ckpt.pt"], may_reexec=True) == 2
    assert "libmissing.so found in" in capsys.readouterr().err


SWITCH = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from titans import system
    system.ALLOCATOR_LIBRARIES = {"jemalloc": ("libstandin.so",)}
    system._library_dirs = lambda: [Path(sys.argv[1])]
    before = system.loaded_allocator()
    system.switch_allocator("jemalloc", may_reexec=True)  # re-executes this very command once
    print(json.dumps({"loaded": system.loaded_allocator(), "argv": sys.argv[1:],
                      "mark": os.environ.get("TITANS_ALLOCATOR_REEXEC"), "before": before}))
    """
)


@pytest.mark.skipif(cpu_compiler() is None, reason="builds a stand-in shared library with the C compiler")
def test_switching_reexecutes_the_same_command_with_the_library_preloaded(tmp_path) -> None:
    source = tmp_path / "standin.c"
    source.write_text("int titans_standin_allocator_marker(void) { return 1; }\n")
    subprocess.run([cpu_compiler(), "-shared", "-fPIC", "-o", str(tmp_path / "libstandin.so"), str(source)], check=True)
    done = subprocess.run(
        [sys.executable, "-c", SWITCH, str(tmp_path), "--flag"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1  # only the re-executed process got past the switch
    result = json.loads(lines[0])
    # the second run of the same command line: the library mapped in, the arguments intact, marked as re-executed
    assert result == {"loaded": "jemalloc", "argv": [str(tmp_path), "--flag"],
                      "mark": "jemalloc", "before": "jemalloc"}  # fmt: skip


@pytest.mark.skipif(find_allocator("jemalloc") is None, reason="jemalloc is not installed")
def test_titans_train_runs_on_jemalloc_when_asked(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "titans", "train", "--allocator", "jemalloc", "training.max_steps=1",
         "model.d_model=16", "model.n_heads=2", "model.n_layers=1", "data.num_samples=40", "data.seq_len=16",
         f"training.out_dir={tmp_path}", "training.progress=false", "training.device=cpu"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert json.loads(done.stdout.strip().splitlines()[-1])["allocator"] == "jemalloc"
