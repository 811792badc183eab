"""Moving a remote cell's inputs and outputs: variables and files."""
