from agepipe.cli import main

main()
