# SPDX-License-Identifier: Apache-2.0
"""`python -m tidal ...` is the `tidal` command (run, chat, info)."""

import sys

from .cli import main

sys.exit(main())
