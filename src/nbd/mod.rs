//! SKELETON: nbd, to be written.
