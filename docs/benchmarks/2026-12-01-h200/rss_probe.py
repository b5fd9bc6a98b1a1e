"""Where a GPU process's resident memory goes: RSS split (anon / file) after each first use."""
import re, time
from pathlib import Path
def rss(tag):
    s = Path("/proc/self/status").read_text()
    f = {k: int(re.search(rf"^{k}:\s+(\d+)", s, re.M).group(1)) / 2**20 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    print(f"{tag:28s} " + "  ".join(f"{k} {v:.2f} GiB" for k, v in f.items()), flush=True)
rss("start")
import jax, jax.numpy as jnp, numpy as np
rss("import jax")
jax.devices(); rss("jax.devices()")
x = jax.device_put(np.ones((1024, 1024), np.float32)); x.block_until_ready(); rss("device_put 4 MB")
y = (x + 1).block_until_ready(); rss("first jit (add)")
z = (x @ x).block_until_ready(); rss("first matmul")
b = jax.device_put(np.ones((64 * 2**20 // 2,), np.uint16)); b.block_until_ready(); rss("device_put 64 MB")
for i in range(32):
    jax.device_put(np.ones((64 * 2**20 // 2,), np.uint16)).block_until_ready()
rss("32 x device_put 64 MB")
a = jnp.zeros((512 * 2**20,), jnp.uint16)
a = jax.jit(lambda a, v: jax.lax.dynamic_update_slice(a, v, (0,)), donate_argnums=0)(a, b).block_until_ready(); rss("in-place update 1 GB")
