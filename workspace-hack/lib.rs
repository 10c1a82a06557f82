//! Nothing to see: this crate exists for its manifest (see `generate.py`).
