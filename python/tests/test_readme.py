"""The README's Python example, run as printed: the ```python block of README.md's "Python" section."""

from __future__ import annotations

from pathlib import Path

import pytest

import qcow2rs

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_python_block() -> str:
    """The block, preceded by blank lines so that a traceback gives README.md's line numbers."""
    text = README.read_text()
    start = text.index("\n## Python\n")
    section = text[start:].split("\n## ", 2)[1]
    blocks = section.split("```python\n")
    assert len(blocks) == 2, "want one ```python block in the README's Python section"
    before = text[: start + 1] + "## " + blocks[0] + "```python\n"
    return "\n" * before.count("\n") + blocks[1].split("\n```", 1)[0] + "\n"


def test_readme_python_example_runs_as_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = readme_python_block()
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__main__"})

    out = capsys.readouterr().out
    # The block's comment promises this output.
    assert out.startswith("CheckResult(corruptions=0, leaks=0, "), out
    with qcow2rs.open(tmp_path / "disk.qcow2", password="s3cret") as img:
        assert img.read_at(0, 12) == b"hello, qcow2"
        assert img.info().backing_file == "base.qcow2"
        assert img.info().crypt_method == 2


def test_python_readme_example_runs_as_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """python/README.md's example (the package's own page, which PyPI would show)."""
    page = README.parent / "python" / "README.md"
    text = page.read_text()
    blocks = text.split("```python\n")
    assert len(blocks) == 2, "want one ```python block in python/README.md"
    code = "\n" * blocks[0].count("\n") + blocks[1].split("\n```", 1)[0] + "\n"
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(page), "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out == f"{64 << 20} True\n"
    assert (tmp_path / "disk.raw").stat().st_size == 64 << 20
    with open(tmp_path / "disk.raw", "rb") as f:
        f.seek(1 << 20)
        assert f.read(12) == b"hello, qcow2"
