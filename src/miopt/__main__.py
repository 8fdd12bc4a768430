import sys

from miopt.cli import main

sys.exit(main())
