import sys

from proxyd.cli import main

sys.exit(main())
