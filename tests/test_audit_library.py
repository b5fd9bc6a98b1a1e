"""The CLI's one error and interrupt handler, and the library's behaviour on import (issue 24)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from apd_jax.cli import app as cli

README = Path(__file__).parents[1] / "README.md"


def test_an_os_error_is_one_line_naming_the_file_and_its_cause():
    err = PermissionError(13, "Permission denied", "/data/out.jsonl")
    assert cli.error_message(err) == "/data/out.jsonl: Permission denied"
    assert cli.error_message(FileNotFoundError("prompts file p.txt not found")) == "prompts file p.txt not found"


def test_an_interrupted_command_without_outputs_says_nothing_was_written():
    args = argparse.Namespace(func=test_an_os_error_is_one_line_naming_the_file_and_its_cause)
    assert cli.interrupted_note(args) == "nothing was written"


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted_run(args):
        raise KeyboardInterrupt

    import apd_jax.cli.generate as generate

    monkeypatch.setattr(generate, "run", interrupted_run)  # add_parser registers `run` when the parser is built
    assert cli.main(["--no-compile-cache", "generate", "--ids", "1 2"]) == 130
    assert capsys.readouterr().err.splitlines() == ["apd-jax generate: interrupted; nothing was written"]


_NO_TORCH = """
import importlib.util, sys
find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "torch" else find(name, *a, **k)
if sys.argv[1] == "apd_jax":
    import apd_jax.checkpoints
import transformers
"""


def test_importing_apd_jax_keeps_transformers_advice_out_where_torch_is_absent(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(README.parent), env.get("PYTHONPATH", "")])  # this checkout's apd_jax
    run = lambda first: subprocess.run([sys.executable, "-c", _NO_TORCH, first], capture_output=True, text=True,  # noqa: E731
                                       env=env, cwd=tmp_path, timeout=120)
    plain, library = run("transformers"), run("apd_jax")
    assert plain.returncode == 0 and "PyTorch was not found" in plain.stderr  # the notice this test guards against
    assert library.returncode == 0 and "PyTorch was not found" not in library.stderr, library.stderr


def test_the_readme_python_snippet_runs_on_the_embedded_pair(capsys):
    text = README.read_text()
    start = text.index("```python\nimport apd_jax")
    code = text[start + len("```python\n"): text.index("```", start + 3)]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    result = scope["result"]
    assert len(result.lengths) == 2 and all(0 < n <= 64 for n in result.lengths)
    assert capsys.readouterr().out.startswith("[")


def test_ctrl_c_lost_in_a_callback_still_ends_the_command(monkeypatch, capsys):
    """A KeyboardInterrupt raised inside __del__ (as inside JAX's gc callback) is not lost: exit 130."""
    import time

    import apd_jax.cli.generate as generate

    class InterruptedFinalizer:
        def __del__(self):
            raise KeyboardInterrupt

    def run(args):
        InterruptedFinalizer()  # dropped at once: Python can only report its exception as unraisable
        time.sleep(5)  # the interrupt is raised again here
        return 0

    monkeypatch.setattr(generate, "run", run)
    start = time.perf_counter()
    assert cli.main(["--no-compile-cache", "generate", "--ids", "1 2"]) == 130
    assert time.perf_counter() - start < 4
    err = capsys.readouterr().err
    assert err.splitlines() == ["apd-jax generate: interrupted; nothing was written"], err
