"""``python -m rltrain`` = the ``rltrain`` console script."""

from rltrain.cli import train_main

if __name__ == "__main__":
    train_main()
