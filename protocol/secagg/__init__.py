"""Secure aggregation (issue 22): the coordinator learns the sum of the sites' updates, never one.

LightSecAgg-style (So et al., MLSys 2022): every site masks its quantised update with a
cryptographic stream, encodes the mask into N shares (MDS over the prime field) sent
encrypted to the other sites through the broker, and when a round or a buffer closes any U
surviving sites answer one request with the sum of their shares for exactly that set of
contributors, from which the coordinator decodes the sum of the masks. Pure functions only
here; the site's rules live in ``site_worker/secagg.py``. See docs/secure-aggregation.md.
"""
