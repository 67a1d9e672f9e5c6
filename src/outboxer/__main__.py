"""``python -m outboxer``: the command line, where the ``outboxer`` script is not on PATH."""

from outboxer.cli import main

if __name__ == "__main__":
    main()
