from surd.cli import main

main()
