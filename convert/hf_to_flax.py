"""Convert a Hugging Face Qwen2 / Dream checkpoint directory to an apd_jax (orbax) checkpoint.

    python convert/hf_to_flax.py HF_DIR OUT_DIR
"""

import sys

from apd_jax.cli.app import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-flax", *sys.argv[1:]]))
