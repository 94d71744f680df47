"""``python -m iterlayers ...`` and ``torchrun --nproc_per_node=N -m iterlayers train ...``."""
import sys

from iterlayers.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
