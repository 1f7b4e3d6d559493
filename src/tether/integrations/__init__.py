"""Host-side integrations with other frameworks, each importing its framework at module level.

Nothing else in tether imports these modules (tests/test_layering.py checks it): the rest stays usable
without the frameworks, and the device side on the standard library alone.

- :mod:`tether.integrations.meta_schedule`: ``TetherRunner``, TVM meta_schedule's ``RPCRunner`` measured
  through tether (needs apache-tvm).
"""
