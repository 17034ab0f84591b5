"""``python -m simulators --broker mqtt://host:port ...``"""

from simulators.cli import main

raise SystemExit(main())
