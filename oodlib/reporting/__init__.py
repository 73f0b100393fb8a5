"""Reporting: what a person looks at — PNG plots (matplotlib, Agg) and Markdown tables — kept out
of the science modules. One module per capability (``ood``, ``errors``, ``attribution``, …);
matplotlib is imported inside the plotting functions only."""
