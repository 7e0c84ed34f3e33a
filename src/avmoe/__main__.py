"""``python -m avmoe`` == the ``avmoe`` / ``lightning`` console scripts."""

from avmoe.cli import cli_main

if __name__ == "__main__":
    cli_main()
