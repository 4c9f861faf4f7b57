from respserve.cli import main

main()
