from primis.cli import main

main()
