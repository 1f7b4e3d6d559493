"""The pool as a service: the tracker's web side (page, JSON API) and its Prometheus metrics (``pip install
'tether[hub]'``). The tracker's core runs without it."""
