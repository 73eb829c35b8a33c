"""Scaling-law sweeps: plan and run a grid or IsoFLOP design of tiny-to-large training runs
(cooldown branches included), store the results, fit Chinchilla / IsoFLOP / Kaplan laws, plot."""
