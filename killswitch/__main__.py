"""`python -m killswitch`."""

from killswitch.cli import main

main()
