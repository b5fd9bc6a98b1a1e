"""Write the notebooks from their cell sources (kept here so diffs stay readable).

    python notebooks/build.py   # rewrites notebooks/*.ipynb (without outputs); tests/test_notebooks.py executes them
"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent

QUICKSTART = [
    ("md", "# apd_jax quickstart\n\nLoad the embedded drafter/verifier pair, generate with APD, look at the "
           "accepted tokens per pass, and sweep R: throughput (tokens per pass) against agreement with the "
           "verifier's own greedy output."),
    ("code", "%matplotlib inline\nimport matplotlib.pyplot as plt\n"
             "from apd_jax import ASSETS_DIR\nfrom apd_jax.decoding.apd import APDConfig, apd_generate\n"
             "from apd_jax.decoding.autoregressive import ARConfig, ar_generate\n"
             "from apd_jax.checkpoints import load_model, load_tokenizer\n\n"
             "drafter = load_model(ASSETS_DIR / 'drafter')\nverifier = load_model(ASSETS_DIR / 'verifier')\n"
             "tok = load_tokenizer(ASSETS_DIR / 'drafter')"),
    ("code", "prompts = ['class Stack:\\n    def __init__(self):\\n', 'def read_config(path):\\n']\n"
             "ids = [tok.encode(p) for p in prompts]\n"
             "result = apd_generate(drafter, verifier, ids, APDConfig(R=0.7, W=16, M=100, max_new_tokens=48))\n"
             "for p, seq in zip(prompts, result.sequences()):\n    print(p + tok.decode(seq))\n    print('---')\n"
             "print('tokens per pass:', round(result.tokens_per_pass(), 2))"),
    ("code", "fig, ax = plt.subplots(figsize=(6, 3))\nfor row, p in enumerate(prompts):\n"
             "    ax.plot(result.accepted_per_pass(row), marker='o', label=p.splitlines()[0])\n"
             "ax.set_xlabel('pass'); ax.set_ylabel('tokens accepted'); ax.legend(); fig.tight_layout()"),
    ("md", "## The R trade-off\n\nAgreement is the fraction of positions where APD's output equals the verifier's "
           "greedy continuation (R = 0 reproduces it up to each pass's first token, which is always the drafter's)."),
    ("code", "reference = ar_generate(verifier, ids, ARConfig(max_new_tokens=48)).sequences()\nrows = []\n"
             "for R in (0.0, 0.3, 0.5, 0.7, 0.9, 1.0):\n"
             "    r = apd_generate(drafter, verifier, ids, APDConfig(R=R, W=16, M=100, max_new_tokens=48))\n"
             "    agree = sum(a == b for s, ref in zip(r.sequences(), reference) for a, b in zip(s, ref))\n"
             "    rows.append((R, r.tokens_per_pass(), agree / sum(map(len, reference))))\n"
             "for R, tpp, agree in rows:\n    print(f'R={R:.1f}  tokens/pass {tpp:5.2f}  agreement {agree:.2f}')\n"
             "fig, ax = plt.subplots(figsize=(4, 3))\nax.plot([r[2] for r in rows], [r[1] for r in rows], marker='o')\n"
             "for R, tpp, agree in rows:\n    ax.annotate(f'R={R}', (agree, tpp))\n"
             "ax.set_xlabel('agreement with verifier greedy'); ax.set_ylabel('tokens per pass'); fig.tight_layout()"),
]

PARITY = [
    ("md", "# Parity study: JAX against PyTorch, layer by layer\n\nA tiny random Qwen2 checkpoint in Hugging Face "
           "layout, run by transformers (PyTorch, float32) and by apd_jax in float32 and bfloat16; the largest "
           "difference of each layer's output."),
    ("code", "import tempfile\nimport numpy as np, torch, jax.numpy as jnp\n"
             "from transformers import Qwen2ForCausalLM\nfrom apd_jax.bench.torch_reference.checkpoints import save_tiny_qwen2\n"
             "from apd_jax.checkpoints import load_hf\n\n"
             "path = save_tiny_qwen2(tempfile.mkdtemp(), seed=1)\n"
             "ref = Qwen2ForCausalLM.from_pretrained(path, attn_implementation='eager', dtype=torch.float32).eval()\n"
             "tokens = np.random.default_rng(0).integers(0, 320, size=(1, 128))"),
    ("code", "with torch.no_grad():\n    out = ref(torch.as_tensor(tokens), output_hidden_states=True)\n"
             "torch_layers = [h.numpy() for h in out.hidden_states]\n\n"
             "def jax_layers(model):\n    x = model.embed_tokens(jnp.asarray(tokens))\n    outs = [x]\n"
             "    positions = jnp.arange(tokens.shape[1])[None]\n    end = jnp.array([tokens.shape[1]])\n"
             "    for i, layer in enumerate(model.layers):\n        x, _ = layer(x, positions, end, None, i)\n        outs.append(x)\n"
             "    outs[-1] = model.norm(x)  # HF's last hidden state is after the final norm\n"
             "    return [np.asarray(o, np.float32) for o in outs]\n\n"
             "for dtype in ('float32', 'bfloat16'):\n    ours = jax_layers(load_hf(path, param_dtype=dtype))\n"
             "    diffs = [np.abs(a - b).max() for a, b in zip(ours, torch_layers)]\n"
             "    print(dtype, ['%.2e' % d for d in diffs])"),
]


def write(name: str, cells: list[tuple[str, str]]) -> None:
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbf.write(nb, HERE / name)


if __name__ == "__main__":
    write("quickstart.ipynb", QUICKSTART)
    write("parity_study.ipynb", PARITY)
