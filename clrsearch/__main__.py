"""`python -m clrsearch` runs the command line."""

from clrsearch.cli import main

main()
