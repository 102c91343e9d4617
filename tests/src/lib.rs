//! Shared helpers for ka's integration tests.
