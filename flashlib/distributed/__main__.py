"""python -m flashlib.distributed [--nproc P] [--backend nccl|gloo]: the self-check on P processes."""
from .check import main

if __name__ == "__main__":        # spawned children import this module as __mp_main__: they must not run main
    raise SystemExit(main())
