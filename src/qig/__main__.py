import sys

from qig.cli import main

sys.exit(main())
