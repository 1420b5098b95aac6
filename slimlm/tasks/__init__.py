"""Tasks: each turns data into tokenizable examples (ranking, text, completion)."""
