//! SKELETON: the data directory (key store + volumes), to be written.
