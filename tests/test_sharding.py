"""Sharded APD: identical greedy output on (data, model) meshes of 8 virtual CPU devices, placement as
declared, and clear errors for meshes that do not divide the model or the batch.

The 8-device checks run in a fresh process (tests/sharded_checks.py): the virtual device count
is fixed when jax starts, and this process's jax has started already with one device.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh

from apd_jax.decoding.apd import APDConfig, apd_generate
from apd_jax.models.config import tiny_config
from apd_jax.models.model import abstract_model
from apd_jax.models.sharding import make_mesh, parse_mesh, shard_model

CHECKS = (
    "apd_matches_single_device",  # greedy and sampled, meshes (1,8), (2,4), (8,1): tokens and acceptances
    "forward_logits_match",  # fp32 logits of a full forward within 1e-5
    "params_sharded_as_declared",
    "caches_sharded_as_declared",  # after a prefill, and inside the compiled APD loop
    "orbax_restores_into_shards",
    "hf_loads_into_shards",  # load_hf(mesh=): every device reads only its slice of each HF tensor
    "cli_mesh_flag",  # apd-jax generate --mesh data=2,model=2 prints what the single-device run prints
)


@pytest.fixture(scope="module")
def sharded_results() -> dict[str, str]:
    script = Path(__file__).with_name("sharded_checks.py")
    proc = subprocess.run([sys.executable, str(script), *CHECKS], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", CHECKS)
def test_on_8_virtual_devices(check, sharded_results):
    assert sharded_results[check] == "ok", sharded_results[check]


def mesh(data: int, model: int) -> AbstractMesh:
    """Shapes only: the divisibility checks run before anything is placed."""
    return AbstractMesh((data, model), ("data", "model"))


@pytest.mark.parametrize(
    "overrides, model_axis, dimension",
    [
        # The fused q/k/v projection splits by KV-head group, so the KV heads are what must divide.
        (dict(num_heads=6, num_kv_heads=6, head_dim=8, hidden_size=48), 4, "num_kv_heads=6"),
        (dict(num_heads=8, num_kv_heads=2, head_dim=8), 4, "num_kv_heads=2"),
        (dict(num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=132), 8, "intermediate_size=132"),
        (dict(num_heads=8, num_kv_heads=8, head_dim=8, vocab_size=324), 8, "vocab_size=324"),
    ],
)
def test_mesh_that_does_not_divide_the_model_names_the_dimension(overrides, model_axis, dimension):
    model = abstract_model(tiny_config(True, **overrides))
    message = f"{dimension} is not divisible by the mesh's 'model' axis of size {model_axis}"
    with pytest.raises(ValueError, match=message):
        shard_model(model, mesh(1, model_axis))


def test_batch_not_divisible_by_data_is_an_error():
    drafter, verifier = abstract_model(tiny_config(False)), abstract_model(tiny_config(True))
    with pytest.raises(ValueError, match="batch of 3 prompts is not divisible by the mesh's 'data' axis of size 2"):
        apd_generate(drafter, verifier, [[1], [2], [3]], APDConfig(max_new_tokens=4), mesh=mesh(2, 1))


def test_parse_mesh():
    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    assert parse_mesh("model=2") == {"data": 1, "model": 2}
    for bad in ("data=0", "pipe=2", "data=two", "data"):
        with pytest.raises(ValueError, match="expected 'data=N,model=M'"):
            parse_mesh(bad)


def test_mesh_larger_than_the_devices_is_an_error():
    with pytest.raises(ValueError, match="needs 1024 devices"):
        make_mesh(data=2, model=512)
