"""The whole code base passes the linters configured in pyproject.toml: ruff and `mypy --strict`."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint(tool: str, *args: str) -> str:
    """The tool's findings ("" when there are none), run from the repository root so pyproject.toml applies."""
    result = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if f"No module named {tool}" in result.stderr:
        pytest.fail(f"{tool} is not installed; it comes with the test extra: pip install -e '.[test]'", pytrace=False)
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_ruff_finds_nothing_in_the_package_tests_and_benchmarks() -> None:
    findings = lint("ruff", "check", "--output-format=concise", "gpuspawner", "tests", "benchmarks")
    assert not findings, findings


def test_the_whole_package_passes_mypy_strict() -> None:
    findings = lint("mypy", "--strict", "gpuspawner")
    assert not findings, findings
