"""What the scripts share on the command line: the settings block, --NAME=value overrides, --help."""
