"""`python -m apd_jax.cli NAME ...`: the same as `apd-jax NAME ...`."""

import sys

from apd_jax.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
