"""One module per subcommand: its argparse parser and the function that runs it."""
