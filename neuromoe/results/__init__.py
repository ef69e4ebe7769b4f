"""Results: evaluation tables, figures, saliency explanations, and prediction for new subjects.

The top layer under the command line: may import every other subpackage.
"""
