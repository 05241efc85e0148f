"""One module per command; each registers its parser and returns an exit code."""
