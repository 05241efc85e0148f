"""`python -m cli`: the same as the `tokensend` command."""

import sys

from cli.main import main

sys.exit(main())
