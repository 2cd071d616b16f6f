"""bulk2sc: code shared by the numbered pipeline stages.

The stages (`_0_download_data.py` ... `_5_generate_sc.py`) are thin scripts; everything they
share (paths, constant overrides, I/O, TPM, seeding, logging, the GMVAE and the scTAPE wrapper)
lives in this package so that it exists exactly once and can be unit-tested without files.
"""
