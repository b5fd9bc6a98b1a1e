"""Training: the embedded pair from scratch (`apd-jax train`) and Learn2PD's filter (`apd-jax train-filter`).

The modules, each importing only those above it in this list:
  settings         the settings of `apd-jax train` and their defaults (no training code: the CLI reads them)
  objectives       the drafter's masked diffusion loss, the verifier's next-token loss, completion metrics
  loop             train_model: the optimizer, the model as trained, steps fitted to the free memory
  outputs          what train writes (the RECORD, save_model) and that it replaces only its own outputs
  pipeline         run_pipeline: corpus, tokenizer, drafter, verifier, then the APD check
  learn2pd_oracle  the Extremely Greedy Parallel oracle's traces, Learn2PD's training data
  learn2pd_train   fitting Learn2PD's filter to those traces

The names below are importable from here (`from apd_jax.training import train_model`), each imported
on first use, so that reading the settings loads no training code (optax, the model).
"""

from apd_jax.utils.lazy import lazy_names

_PUBLIC = {
    "apd_jax.training.settings": ("PipelineSettings", "TrainSettings"),
    "apd_jax.training.objectives": ("AR_OBJECTIVE", "Objective", "diffusion_loss", "diffusion_mask",
                                    "diffusion_objective"),
    "apd_jax.training.loop": ("MatmulEmbed", "fit_micro_batches", "for_training", "train_model"),
    "apd_jax.training.outputs": ("save_model",),
    "apd_jax.training.pipeline": ("run_pipeline",),
}
__all__, __getattr__, __dir__ = lazy_names(__name__, _PUBLIC, globals())
