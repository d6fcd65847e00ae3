import sys

from moeprof.commands.main import main

sys.exit(main())
