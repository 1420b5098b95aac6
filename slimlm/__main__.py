from slimlm.cli import main

main()
