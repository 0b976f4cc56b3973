//! Helpers shared by the cross-boundary tests.
