"""The server side: settings, connections, rounds, validation, evaluation and checkpoints."""
