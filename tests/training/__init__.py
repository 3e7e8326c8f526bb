"""Tests of pyro_vi_ext.training."""
