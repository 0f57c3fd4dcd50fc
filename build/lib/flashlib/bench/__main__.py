from .grid import main

main()
