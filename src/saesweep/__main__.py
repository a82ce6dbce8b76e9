import sys

from saesweep.cli import main

sys.exit(main())
