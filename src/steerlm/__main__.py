"""`python -m steerlm <command> ...` (and `torchrun -m steerlm <command> ...`): the `steerlm` command."""

from .cli import console_main

if __name__ == "__main__":
    console_main()
