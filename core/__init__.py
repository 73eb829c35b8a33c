"""The ground floor: configuration (the config system and every typed section), the model's shape
and FLOP arithmetic, the layout arithmetic, the parallel-plan type and the error root.

No torch and no other project package is imported here, so every package may import core and a
config loads, and a layout is planned, on any machine (see README.md, Architecture)."""
