import sys

from rustinfer.cli.main import main

sys.exit(main())
