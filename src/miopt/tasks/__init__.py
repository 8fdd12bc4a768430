"""Built-in tasks (problem generators with answer checking)."""
