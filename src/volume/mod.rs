//! SKELETON: volume, to be written.
