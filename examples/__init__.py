"""Examples that need optional packages (Lightning)."""
