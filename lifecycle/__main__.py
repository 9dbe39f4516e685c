"""``python -m lifecycle`` (and ``torchrun -m lifecycle train ...``) runs the CLI."""

from lifecycle.cli import main

if __name__ == "__main__":
    main()
