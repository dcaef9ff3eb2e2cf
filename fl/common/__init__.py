"""Pure helpers both sides use: a state's flat layout, vector math, logging, process limits."""
