"""Compositions of the engine: ablation, calibration, APDS pseudo-labels, self-training, tuning, NNI, the demo.

A workflow imports the engine and the layers below it, never another workflow's internals.
"""
