"""`python -m trainer ...` is `meshformer ...`; with only overrides (`python -m trainer --config F`)
it trains, so `torchrun -m trainer --config F` works as the issue's examples show."""
import sys

from trainer.cli import main

argv = sys.argv[1:]
if argv and argv[0].startswith("--") and argv[0] not in ("--help", "--version"):
    argv = ["train", *argv]
sys.exit(main(argv))
