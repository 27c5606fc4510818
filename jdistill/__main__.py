import sys

from jdistill.cli import main

sys.exit(main())
