"""How to do it across ranks: the process grid and point-to-point transport."""
