"""The command the service tests start: the real ``modelnode serve`` (followed by ``--config FILE``)."""

from __future__ import annotations

import sys

SERVE = [sys.executable, "-c", "import sys; from node.cli import main; sys.exit(main())", "serve"]
