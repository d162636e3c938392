"""The command line: one parser, the commands, and the rendering of what the daemon says."""
