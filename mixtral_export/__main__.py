from mixtral_export.entry import main

main()
