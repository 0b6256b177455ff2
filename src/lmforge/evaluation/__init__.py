"""`lmforge eval`'s work: the options, each kind of metric and the side-by-side report
(the recipe in recipes/eval.py is the command's glue)."""
