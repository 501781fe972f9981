"""Every stage's command: `python -m sferd.pipeline.launch [--params FILE] STAGE` (DESIGN.md "Scale").

Placeholder until the launcher that reads the machine-local runtime settings and starts torchrun lands: it runs the
stage in this process, through the stage runner, with the same arguments.
"""

import sys

from sferd.pipeline.run import main

if __name__ == "__main__":
    sys.exit(main())
