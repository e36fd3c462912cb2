import sys

from vlm_depth.cli import main

sys.exit(main())
