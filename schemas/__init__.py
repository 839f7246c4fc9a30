"""Arrow schemas of crossrank's inputs, outputs and stats, and the validation users read."""
