import sys

from recur.cli import main

sys.exit(main())
