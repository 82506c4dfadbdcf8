import sys

from vmferry.cli import main

sys.exit(main())
