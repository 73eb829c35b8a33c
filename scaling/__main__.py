import sys

from scaling.cli import main

sys.exit(main(sys.argv[1:]))
