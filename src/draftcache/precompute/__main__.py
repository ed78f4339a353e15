import sys

from draftcache.precompute.cli import main

sys.exit(main())
