"""The published LLaDA modeling code (NVlabs/Fast-dLLM's llada/model/, Apache-2.0: the license's text is
bench/LICENSE-Apache-2.0.txt; changes listed at the top of each file): import configuration_llada and modeling_llada themselves. Fast-dLLM's
package __init__ imports both; this one imports nothing, so walking apd_jax's packages loads no torch."""
