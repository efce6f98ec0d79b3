from financing.entrypoints.cli import main

main()
