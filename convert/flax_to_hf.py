"""Export an apd_jax (orbax) checkpoint back to Hugging Face safetensors + config.json.

    python convert/flax_to_hf.py FLAX_DIR OUT_DIR
"""

import sys

from apd_jax.cli.app import main

if __name__ == "__main__":
    sys.exit(main(["convert", "flax-to-hf", *sys.argv[1:]]))
