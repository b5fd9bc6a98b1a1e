"""The PyTorch reference of the parity tests: what apd_jax is compared with at float32 (tests/) and
timed against (`apd-jax bench --torch`, apd_jax.bench.pytorch). It imports torch, a test extra:
nothing else in the library imports it.

The modules, each importing only those above it in this list:
  checkpoints  tiny random Hugging Face-layout checkpoints (the tests' fixtures), read back whole
  dream        the Dream model (Qwen2 layers, full attention), its cache crop and logit shift
  decoders     the published APD / left-to-right loop and Dream's diffusion sampler, greedy, batch 1

This file imports nothing: walking the package's modules (tests/test_public_api.py) imports it,
and that must not load torch.
"""
