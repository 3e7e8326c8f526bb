"""Disentanglement metrics.

:func:`mutual_information_gap` is the MIG of Chen et al. (2018), with the histogram estimator of
disentanglement_lib for point codes and the encoder-distribution estimator of the paper.
"""

from pyro_vi_ext.metrics.mig import MIGResult, mutual_information_gap

__all__ = ["MIGResult", "mutual_information_gap"]
