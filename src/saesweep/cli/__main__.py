import sys

from saesweep.cli.app import main

sys.exit(main())
