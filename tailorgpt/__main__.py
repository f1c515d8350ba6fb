from tailorgpt.cli import main

main()
