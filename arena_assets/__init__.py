"""arena-assets: the LMSYS Chatbot Arena 1st-place recipe as fold-partitioned Dagster assets."""

__version__ = "0.1.0"
