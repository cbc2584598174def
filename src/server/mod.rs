//! SKELETON: server, to be written.
