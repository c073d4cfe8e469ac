"""raytransfer: the experiment of Yosinski et al. 2014 as one Ray Tune sweep."""
__version__ = "0.1.0"
