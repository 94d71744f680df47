"""``python -m iterlayers ...`` and ``torchrun --nproc_per_node=N -m iterlayers train ...``."""
import os
import sys

from iterlayers.cli import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A worker launched by torchrun has destroyed its process group by now and written everything it
        # writes. Skip interpreter finalisation: there, Gloo's C++ threads can still hold objects whose
        # destruction needs the interpreter, and under load that aborts the process ("terminate called
        # without an active exception", SIGABRT) after a successful run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
