import sys

from vlm_depth.cli import main

# Guarded: worker processes (forkserver/spawn, e.g. `vlm-depth synth --workers N`) re-import this module.
if __name__ == "__main__":
    sys.exit(main())
