import sys

from fileproxy.cli import main

sys.exit(main())
