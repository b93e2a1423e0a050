"""Optimizers: Lion, Sophia, Prodigy, Schedule-Free AdamW, SOAP, Muon."""
# Each optimizer module adds its import line here.
