import sys

from pte.cli import main

sys.exit(main())
