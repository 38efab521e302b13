import sys

from dpfl.cli.main import main

sys.exit(main())
