"""Tiny random checkpoints in the Hugging Face layout, the fixtures of every parity test, written with
torch and safetensors: a Qwen2ForCausalLM verifier (save_tiny_qwen2) and a Dream drafter
(save_tiny_dream), single-file or in two shards; and a checkpoint directory read back whole
(load_safetensors_dir).

Every module of the PyTorch reference imports this one, so the thread setting below holds for all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The models here are tiny: intra-op threads only add synchronisation, and thrash on a shared CPU.
torch.set_num_threads(1)

_WEIGHT_STD = 0.3  # large enough that logits are far from ties and nothing is ~0
_BIAS_STD = 0.3
_NORM_SPREAD = 0.2  # RMSNorm weights drawn uniformly from 1 +- 0.2


def _param_shapes(
    *, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
    num_heads: int, num_kv_heads: int, tie_word_embeddings: bool,
) -> dict[str, tuple[int, ...]]:
    """Qwen2/Dream parameter names and shapes, in a fixed order (the RNG draws in this order)."""
    hd = hidden_size // num_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (num_heads * hd, hidden_size),
            p + "self_attn.q_proj.bias": (num_heads * hd,),
            p + "self_attn.k_proj.weight": (num_kv_heads * hd, hidden_size),
            p + "self_attn.k_proj.bias": (num_kv_heads * hd,),
            p + "self_attn.v_proj.weight": (num_kv_heads * hd, hidden_size),
            p + "self_attn.v_proj.bias": (num_kv_heads * hd,),
            p + "self_attn.o_proj.weight": (hidden_size, num_heads * hd),
            p + "mlp.gate_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": (hidden_size, intermediate_size),
            p + "input_layernorm.weight": (hidden_size,),
            p + "post_attention_layernorm.weight": (hidden_size,),
        }
    shapes["model.norm.weight"] = (hidden_size,)
    if not tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_size, hidden_size)
    return shapes


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = 1.0 + _NORM_SPREAD * (2.0 * torch.rand(shape, generator=gen) - 1.0)
        elif name.endswith(".bias"):
            t = _BIAS_STD * torch.randn(shape, generator=gen)
        else:
            t = _WEIGHT_STD * torch.randn(shape, generator=gen)
        state[name] = t.to(dtype).contiguous()
    return state


def _write_weights(path: Path, state: dict[str, torch.Tensor], sharded: bool) -> None:
    """model.safetensors, or exactly two shards plus model.safetensors.index.json."""
    if not sharded:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(state)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map: dict[str, str] = {}
    for fname, keys in files.items():
        save_file({k: state[k] for k in keys}, str(path / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in keys}
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_tiny_qwen2(
    path: str | Path, *, seed: int = 0, vocab_size: int = 320, hidden_size: int = 64,
    intermediate_size: int = 128, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    tie_word_embeddings: bool = True, rope_theta: float = 10000.0, max_position_embeddings: int = 512,
    eos_token_id: int = 2, dtype: torch.dtype = torch.float32, sharded: bool = False,
) -> Path:
    """Random tiny Qwen2ForCausalLM in the Hugging Face layout (the verifier fixture)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, attn_implementation="eager",
    )
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config).eval()
    shapes = _param_shapes(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
    )
    state = _random_state(shapes, seed, dtype)
    # HF initialises biases to 0 and norms to 1: overwrite every parameter, strictly.
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model = model.to(dtype)
    if sharded:
        config.dtype = dtype
        config.save_pretrained(path)
        _write_weights(path, state, sharded=True)
    else:
        model.save_pretrained(path)
    if not (path / "generation_config.json").exists():
        GenerationConfig(bos_token_id=eos_token_id, eos_token_id=eos_token_id).save_pretrained(path)
    # transformers 5 writes rope_parameters/dtype; real Qwen2.5 checkpoints carry the legacy
    # top-level rope_theta/torch_dtype. Keep both so loaders written for either layout work.
    cfg = json.loads((path / "config.json").read_text())
    cfg.setdefault("rope_theta", rope_theta)
    cfg.setdefault("torch_dtype", _dtype_name(dtype))
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return path


def save_tiny_dream(
    path: str | Path, *, seed: int = 0, vocab_size: int = 336, hidden_size: int = 64,
    intermediate_size: int = 128, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    rope_theta: float = 10000.0, max_position_embeddings: int = 512, mask_token_id: int = 330,
    eos_token_id: int = 2, pad_token_id: int = 2, bos_token_id: int | None = None,
    dtype: torch.dtype = torch.float32, sharded: bool = False,
) -> Path:
    """Random tiny Dream checkpoint (config.json with Dream's fields, Qwen2 key names, untied lm_head)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bos = eos_token_id if bos_token_id is None else bos_token_id
    config = {
        "model_type": "Dream",
        "architectures": ["DreamModel"],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "mask_token_id": mask_token_id,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos,
        "eos_token_id": eos_token_id,
        "torch_dtype": _dtype_name(dtype),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen_config = {"mask_token_id": mask_token_id, "eos_token_id": eos_token_id,
                  "pad_token_id": pad_token_id, "bos_token_id": bos}
    (path / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
    shapes = _param_shapes(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, tie_word_embeddings=False,
    )
    _write_weights(path, _random_state(shapes, seed, dtype), sharded)
    return path


def load_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, single-file or sharded (via the index's weight_map)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(path / "model.safetensors"))
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        state |= load_file(str(path / fname))
    if set(state) != set(weight_map):
        raise ValueError(f"shards of {path} do not match the index weight_map")
    return state
