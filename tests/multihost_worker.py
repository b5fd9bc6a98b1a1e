"""One process of test_multihost.py's two-process APD run: `multihost_worker.py PROCESS_ID PORT`.

Each process owns 2 virtual CPU devices; together they form a (data=2, model=2) mesh whose
`data` axis spans the processes. Both build the same tiny pair, generate on the mesh and, on
their own first device alone, the single-device reference. Prints one JSON line: the sharded
run's sequences and acceptances and whether they equal the reference; or, if this jax cannot
run jax.distributed on CPU, {"unavailable": reason}.
"""

from __future__ import annotations

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import json  # noqa: E402

import jax  # noqa: E402

from apd_jax.decoding.apd import APDConfig, apd_generate  # noqa: E402
from apd_jax.models.config import tiny_config  # noqa: E402
from apd_jax.models.model import init_model  # noqa: E402
from apd_jax.models.sharding import make_mesh, shard_model  # noqa: E402

PROMPTS = [[5, 17, 33, 101, 7], [44, 3, 9]]
CONFIG = APDConfig(R=0.7, W=4, M=8, max_new_tokens=16, eos_token_ids=())


def main(process_id: int, port: int) -> dict:
    try:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
            initialization_timeout=60,
        )
    except (RuntimeError, NotImplementedError, ValueError) as err:
        return {"unavailable": f"jax.distributed.initialize failed on CPU: {err}"}
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    # Same seeds on both processes: identical parameters, which shard_model places on the global mesh.
    drafter, verifier = init_model(tiny_config(False), 1), init_model(tiny_config(True), 2)
    reference = apd_generate(drafter, verifier, PROMPTS, CONFIG)  # this process's default device alone
    mesh = make_mesh(data=2, model=2)
    result = apd_generate(shard_model(drafter, mesh), shard_model(verifier, mesh), PROMPTS, CONFIG, mesh=mesh)
    out = {
        "sequences": result.sequences(),
        "accepted": result.accepted.tolist(),
        "matches_single_device": result.sequences() == reference.sequences()
        and (result.accepted == reference.accepted).all().item(),
        "data_axis_spans_processes": sorted({d.process_index for d in mesh.devices[:, 0]}) == [0, 1],
    }
    jax.distributed.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
