from graftlm.cli import main

main()
