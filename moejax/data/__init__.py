"""Data preparation (`prepare`) and the grain training input pipeline (`pipeline`)."""
