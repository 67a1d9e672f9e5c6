from outboxer.cli import main

main()
