from mixtral_export.cli import main

main()
