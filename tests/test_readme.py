"""The README is part of the interface: it opens with the two commands and documents every variable."""

from pathlib import Path

from serve.env_vars import describe

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    head = README.split("```", 2)[1]
    assert "make serve" in head and "make test" in head


def test_every_environment_variable_is_in_the_table():
    table = [line for line in README.splitlines() if line.startswith("| `")]
    for row in describe():
        assert any(line.startswith(f"| `{row['name']}` |") for line in table), row["name"]


def test_tests_mirror_the_source_folders():
    root = Path(__file__).resolve().parent
    for folder in ("serve", "serve/batch", "model", "code", "bench"):
        assert (root / folder / "__init__.py").is_file(), folder
    assert not sorted(root.glob("test_*.py")) or {p.name for p in root.glob("test_*.py")} <= {
        "test_imports.py", "test_readme.py", "test_notebook.py", "test_lock.py"}, "module tests belong in their mirror folder"


def test_every_file_in_serve_and_model_is_described():
    # Sub-packages too (serve/protocol/, serve/batch/): every module has its line, a package's __init__.py
    # when it holds code. And no line names a file that is gone.
    root = Path(__file__).resolve().parent.parent
    for pkg in ("serve", "model"):
        for f in sorted((root / pkg).rglob("*.py")):
            rel = f.relative_to(root).as_posix()
            if f.name == "__init__.py" and not f.read_text().strip():
                continue
            assert f"`{rel}`" in README, f"{rel} missing from the README file table"
    rows = [line.split("`")[1] for line in README.split("## Files", 1)[1].splitlines() if line.startswith("| `")]
    for rel in rows:
        if rel.startswith(("serve/", "model/", "tests/", "bench/")) and "," not in rel and "*" not in rel:
            assert (root / rel.rstrip("/")).exists(), f"the README file table names {rel}, which does not exist"
