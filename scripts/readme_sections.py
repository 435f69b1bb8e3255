"""Regenerate the generated sections of README.md: the config reference and the file tree.

    python scripts/readme_sections.py          # rewrite README.md in place
    python scripts/readme_sections.py --check  # exit 1 if README.md is out of date (run by the tests)

The config table comes from the dataclasses of titans/config/ (each field's default and the docstring under it);
the file tree lists every file git tracks or would track (untracked files that are not ignored included) with the
first line of its module docstring (or a description below), so the README cannot drift from the code.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Files without a module docstring, described here.
DESCRIPTIONS = {
    "README.md": "this file",
    "TECHNICAL_REPORT.md": "the equations as implemented, the chunked derivation, what each test proves",
    "Makefile": "`make run` / `make test` (each builds .venv with pinned dependencies), `make lint`, `make bench`",
    "pyproject.toml": "package metadata, pinned dependencies, extras, ruff and pytest settings",
    "config.yaml": "the default run: MAC on the copy task (seed schema)",
    "configs/seed.yaml": "the seed project's config.yaml, verbatim: it loads unchanged",
    ".ci/run": "CI entry point: lint, then `make test`",
    "scripts/gpu_check.sh": "the checks that need a CUDA GPU (CI has none): CUDA tests, bench_cuda, compiled kernels",
    ".gitignore": "ignored build and run outputs",
    "titans/memory/README.md": "the memory's math, the fused scan and its backward, the functional contract, symbols",
    "titans/memory/csrc/scan.cpp": "the fused memory scan in C++ (forward and reverse scan), compiled on first use",
    "docs/paper_alignment.md": "every component: faithful / resolves an ambiguity / deviates / extends",
    "docs/results.md": "measured results with the command that reproduces each",
    "docs/eval_tasks.md": "MQAR, S-NIAH and text task definitions as implemented, with sources",
    "benchmarks/README.md": "benchmark method, tables and targets",
}

READING_ORDER = [
    "titans/memory/naive.py",
    "titans/memory/chunked.py",
    "titans/memory/scan_torch.py",
    "titans/memory/module.py",
    "titans/models/mac.py",
    "titans/train.py",
    "titans/data.py",
    "titans/run.py",
]


# The config dataclasses in the README table's order, and the file each is defined in.
CONFIG_CLASSES = [
    ("titans/config/model.py", "ModelConfig"),
    ("titans/config/model.py", "MemoryConfig"),
    ("titans/config/data.py", "DataConfig"),
    ("titans/config/training.py", "TrainingConfig"),
    ("titans/config/run.py", "RunConfig"),
]


def class_fields(path: str, name: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(dotted prefix, [(field, default source, docstring)]) of dataclass `name` in `path`, in source order.

    A field is an annotated assignment; its docstring is the string literal right below it (as in torchtitan's
    job_config.py). Raises SystemExit naming the field when one has no docstring.
    """
    source = (ROOT / path).read_text()
    tree = ast.parse(source)
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    prefix = ""
    rows = []
    for stmt, below in zip(node.body, node.body[1:] + [None], strict=True):
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name) or stmt.value is None:
            continue
        key = stmt.target.id
        if key == "_path":
            prefix = ast.literal_eval(stmt.value)
            continue
        doc = below.value.value if isinstance(below, ast.Expr) and isinstance(below.value, ast.Constant) else None
        if not isinstance(doc, str):
            raise SystemExit(f"{path}: {name}.{key} has no docstring under it; the README's config table needs one")
        default = ast.get_source_segment(source, stmt.value) or ""
        rows.append((key, default, " ".join(doc.split())))
    return prefix, rows


def config_rows() -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) for every field of the run config; nested sections are listed by their keys."""
    rows = []
    for path, name in CONFIG_CLASSES:
        prefix, fields = class_fields(path, name)
        for key, default, doc in fields:
            if "default_factory" in default:
                continue  # a nested section, listed under its own prefix
            rows.append((prefix + key, default.replace("None", "null"), doc))
    return rows


def config_table() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, meaning in config_rows():
        lines.append(f"| `{key}` | `{default}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines)


def describe(path: str) -> str:
    if path in DESCRIPTIONS:
        return DESCRIPTIONS[path]
    file = ROOT / path
    if file.suffix == ".py":
        doc = ast.get_docstring(ast.parse(file.read_text()))
        if doc:
            return doc.strip().splitlines()[0].rstrip(".")
    if file.suffix in (".yaml", ".yml"):
        first = file.read_text().splitlines()[0] if file.read_text() else ""
        if first.startswith("#"):
            return first.lstrip("# ").rstrip(".")
    if file.suffix == ".md":
        for line in file.read_text().splitlines():
            if line.startswith("#"):
                return line.lstrip("# ").strip()
    return ""


def file_tree() -> str:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    files = sorted(f for f in set(listed) if (ROOT / f).is_file() and not f.startswith("benchmarks/results/"))
    width = max(len(f) for f in files) + 2
    lines = ["```"]
    for f in files:
        text = describe(f)
        lines.append(f"{f:<{width}}# {text}" if text else f)
    lines.append("```")
    lines.append("")
    lines.append("Reading order: " + " → ".join(f"`{f}`" for f in READING_ORDER) + ".")
    return "\n".join(lines)


def render(text: str) -> str:
    for name, body in (("config-table", config_table()), ("file-tree", file_tree())):
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{body}\n{end}{tail}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = parser.parse_args()
    current = README.read_text()
    wanted = render(current)
    if args.check:
        if current != wanted:
            diff = difflib.unified_diff(
                current.splitlines(), wanted.splitlines(), "README.md", "generated", n=0, lineterm=""
            )
            print("README.md is out of date: run `python scripts/readme_sections.py`", file=sys.stderr)
            print("\n".join(diff), file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
