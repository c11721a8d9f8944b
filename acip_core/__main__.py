import sys

from acip_core.cli import main

sys.exit(main())
