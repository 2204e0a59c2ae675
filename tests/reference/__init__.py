"""Plain float64 references written from the papers' formulas, with no imports from model/ or
optim/: what the implementations are tested against."""
