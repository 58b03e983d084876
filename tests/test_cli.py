"""The command line: errors end as argparse errors (one line, exit code 2), the
package layout keeps its layering, and the entry points still work."""
import ast
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teacache_fast.cli import main

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "teacache_fast"


def _usage_error(capsys, argv):
    """Run the CLI; it must exit with code 2 and print argparse's usage + one error line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[0].startswith("usage: teacache-fast ")
    error_lines = [line for line in lines if ": error: " in line]
    assert len(error_lines) == 1 and error_lines[0] == lines[-1], err
    return error_lines[0]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("flag", ["--height", "--width"])
@pytest.mark.parametrize("value", ["7", "0", "-4", "abc"])
def test_demo_odd_or_bad_latent_size_is_a_usage_error(capsys, flag, value):
    line = _usage_error(capsys, ["demo", flag, value])
    assert f"argument {flag}: {flag} must be an even int" in line


def test_demo_missing_model_path_is_a_usage_error_without_network(capsys, no_network, tmp_path):
    line = _usage_error(capsys, ["demo", "--model", "/nonexistent"])
    assert "teacache-fast demo: error: argument --model: '/nonexistent' is not a local folder" in line
    line = _usage_error(capsys, ["demo", "--model", str(tmp_path)])  # a folder without transformer/
    assert "has no transformer in it" in line


def test_calibrate_errors_are_usage_errors(capsys, no_network, tmp_path):
    line = _usage_error(capsys, ["calibrate", "--model", str(tmp_path / "missing")])
    assert "is neither 'demo' nor a diffusers pipeline folder" in line
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    assert "holds no prompt" in _usage_error(capsys, ["calibrate", "--smoke", "--prompts", str(empty)])
    assert "cannot read" in _usage_error(capsys, ["calibrate", "--smoke", "--prompts", str(tmp_path / "no.txt")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["demo"], ["bench"], ["bench", "e2e"], ["calibrate"]])
def test_device_cuda_without_cuda_is_a_usage_error(capsys, command):
    assert "sees no CUDA device" in _usage_error(capsys, [*command, "--device", "cuda"])


def test_python_dash_m_and_help_texts():
    out = subprocess.run([sys.executable, "-m", "teacache_fast", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for name in ("demo", "bench", "calibrate", "info"):
        assert name in out
    out = subprocess.run([sys.executable, "-m", "teacache_fast", "bench", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "--host-cost" in out and "./teacache-bench" in out and "{ops,e2e}" in out


# --------------------------------------------------------------------------- layering

def _imports(path: Path):
    """Absolute module names imported by a file of the teacache_fast package."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + "._"
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            names.append(mod)
            names += [f"{mod}.{a.name}" for a in node.names]
    return names


def test_core_never_imports_cli():
    for path in PKG.rglob("*.py"):
        if "cli" in path.relative_to(PKG).parts or path.name == "__main__.py":
            continue
        bad = [n for n in _imports(path) if n.startswith("teacache_fast.cli")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_cli_uses_the_core_through_its_public_names():
    """cli/ reaches the core through the facade (teacache_fast, its ops, calibrate, quality,
    models), never through the wrapper's or the backends' modules, which other refactors rename."""
    public = {"ops", "calibrate", "quality", "models", "_version", "__version__", "apply_teacache",
              "remove_teacache", "stats", "reset", "teacache", "TeaCacheConfig"}
    for path in (PKG / "cli").glob("*.py"):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "teacache_fast" or len(parts) == 1 or parts[1] == "cli":
                continue
            assert parts[1] in public, f"cli/{path.name} imports {name}"


def test_benchmarks_do_not_import_each_other():
    for a, b in (("bench_ops", "bench_e2e"), ("bench_e2e", "bench_ops"), ("bench_e2e", "demo"),
                 ("calibrate", "demo"), ("bench_ops", "bench")):
        names = _imports(PKG / "cli" / f"{a}.py")
        assert f"teacache_fast.cli.{b}" not in names, f"cli/{a}.py imports cli/{b}.py"


def test_importing_the_library_does_not_import_the_cli():
    code = ("import sys, teacache_fast, teacache_fast.calibrate, teacache_fast.models; "
            "print(any(m.startswith('teacache_fast.cli') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
