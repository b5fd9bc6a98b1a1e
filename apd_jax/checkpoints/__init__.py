"""Checkpoints: Hugging Face safetensors and apd_jax's orbax checkpoints, streamed onto devices, and
safely written.

The modules, each importing only those above it in this list:
  errors       CheckpointError; config.json read with errors naming the file
  flat         a model as flat parameters: the shapes a checkpoint must hold, each one's HF tensors and
               layout (its family's table, apd_jax.models.family), the model built from them
  streaming    the block reader: blocks read on a few threads and placed onto devices; shardings
  safetensors  a HF directory's index from the headers, checked before any weight is read; slices read
  writes       output directories written whole or not at all, with a manifest (atomic_dir)
  orbax        apd_jax's checkpoints (config.json + orbax params/): written, converted from HF, read
  export       HF safetensors export, sharded as the hub ships them
  loading      load_model (either kind), load_hf, load_tokenizer
Importing any of them starts no thread and opens no C library: the reader threads and the libc handle
(malloc_trim) are made on first use.
"""

from apd_jax.checkpoints.errors import CheckpointError, read_config
from apd_jax.checkpoints.export import MAX_SHARD_SIZE, convert_orbax_to_hf, export_hf, write_hf
from apd_jax.checkpoints.flat import expected_shapes, model_from_params, model_params
from apd_jax.checkpoints.loading import load_hf, load_hf_params, load_model, load_tokenizer
from apd_jax.checkpoints.orbax import convert_hf_to_orbax, load_orbax, save_orbax
from apd_jax.checkpoints.writes import PARTIAL_MARKER, WRITTEN_MANIFEST, atomic_dir, check_output

__all__ = [
    "MAX_SHARD_SIZE", "PARTIAL_MARKER", "WRITTEN_MANIFEST", "CheckpointError", "atomic_dir", "check_output",
    "convert_hf_to_orbax", "convert_orbax_to_hf", "expected_shapes", "export_hf", "load_hf", "load_hf_params",
    "load_model", "load_orbax", "load_tokenizer", "model_from_params", "model_params", "read_config", "save_orbax",
    "write_hf",
]
