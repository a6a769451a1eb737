from finetune.commands.cli import main

main()
