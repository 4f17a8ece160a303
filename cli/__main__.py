import sys

from casa_live.cli.main import main

sys.exit(main())
