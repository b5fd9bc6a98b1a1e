"""What each `apd-jax` command imports: no training code where none is needed, a light `--help`.

Each check runs the CLI in a fresh interpreter and reads its `sys.modules` at exit.
optax is not among the forbidden modules: flax.nnx imports it itself (nnx.Optimizer),
so every command that builds a model loads it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARK = "MODULES:"
HEAVY = {"torch", "transformers", "lm_eval"}  # loaded when a command runs, never to build a parser


def modules_after(argv: list[str]) -> set[str]:
    """The top-level and apd_jax modules loaded by `apd-jax *argv`, run to its exit."""
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: print({MARK!r}, ' '.join(sorted(sys.modules))))\n"
        "from apd_jax import cli\n"
        f"sys.exit(cli.main({argv!r}))\n"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith(MARK)), None)
    assert line is not None, f"apd-jax {argv} (rc {out.returncode}) printed no module list: {out.stderr[-2000:]}"
    return set(line.split()[1:])


@pytest.mark.parametrize(
    "argv, forbidden",
    [
        (["convert", "hf-to-flax", "/nonexistent/src", "/nonexistent/dst"],
         {"apd_jax.training.loop", "apd_jax.decoding.learn2pd", "apd_jax.cli.generate", *HEAVY}),
        (["bench", "--help"], {"apd_jax.training.loop", "apd_jax.decoding.learn2pd", *HEAVY}),
        (["generate", "--help"], {"apd_jax.training.loop", *HEAVY}),
        (["train", "--help"], {"apd_jax.training.loop", *HEAVY}),
        (["--help"], {"apd_jax.training.loop", *HEAVY}),  # every subcommand's parser
    ],
    ids=["convert", "bench", "generate", "train-parser", "help"],
)
def test_commands_import_no_training_code(argv, forbidden):
    loaded = modules_after(argv)
    assert "apd_jax.cli.app" in loaded
    assert not forbidden & loaded, f"apd-jax {' '.join(argv)} imported {sorted(forbidden & loaded)}"


def test_the_check_sees_a_lazy_import():
    # `train` imports the training code when it runs (here: up to its settings check).
    assert "apd_jax.training.loop" in modules_after(["train", "--out", "/nonexistent/out", "--max-files", "1"])
