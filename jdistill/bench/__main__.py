import sys

from jdistill.bench.cli import main

sys.exit(main())
