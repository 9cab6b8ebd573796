import sys

from elta.cli import main

sys.exit(main())
