"""`python -m chatglm_serve`: the `chatglm-serve` command (daemon, terminal chat)."""

import sys

from chatglm_serve.server.cli import main

sys.exit(main())
