"""``python -m watchtower.lab up|down|status|break HOST MODE [ARG]|repair HOST [--site demo]``."""

from watchtower.lab.cli import main

main()
