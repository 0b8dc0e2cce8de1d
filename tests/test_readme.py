"""The README is part of the interface: it opens with the two commands and documents every variable."""

from pathlib import Path

from serve.config import describe

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    head = README.split("```", 2)[1]
    assert "make serve" in head and "make test" in head


def test_every_environment_variable_is_in_the_table():
    table = [line for line in README.splitlines() if line.startswith("| `")]
    for row in describe():
        assert any(line.startswith(f"| `{row['name']}` |") for line in table), row["name"]


def test_every_file_in_serve_and_model_is_described():
    root = Path(__file__).resolve().parent.parent
    for pkg in ("serve", "model"):
        for f in sorted((root / pkg).glob("*.py")):
            if f.name != "__init__.py":
                assert f"`{pkg}/{f.name}`" in README, f"{pkg}/{f.name} missing from the README file table"
