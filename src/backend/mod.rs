//! SKELETON: backend, to be written.
