"""One thin module per CLI subcommand: parse, call the library, print. Nothing imports this package."""
