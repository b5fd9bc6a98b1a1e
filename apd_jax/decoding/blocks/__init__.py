"""The block decoder: the compiled loop over blocks of the answer (loop: its canvas, forward, rule
interface and state), Fast-dLLM's prefix and dual KV caches as its cached forwards (cached),
LLaDA's own decoding as its rule (llada) and Fast-dLLM's Dream decoding (dream, imported from
apd_jax.decoding.blocks.dream: it builds on decoding.diffusion). Dream's sampler, the threshold
and Learn2PD decoders (decoding.diffusion, decoding.learn2pd) and the Learn2PD oracle
(training.learn2pd_oracle) are its rules with one block spanning the answer."""

from apd_jax.decoding.blocks.llada import LLaDAConfig, llada_generate
from apd_jax.decoding.blocks.loop import decode_blocks

__all__ = ["LLaDAConfig", "decode_blocks", "llada_generate"]
