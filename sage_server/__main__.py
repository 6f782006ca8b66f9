"""`python -m sage_server` is the `sage` command."""

from sage_server.cli import main

main()
