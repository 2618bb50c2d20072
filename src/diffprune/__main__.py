from diffprune.cli import main

main()
