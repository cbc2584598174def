//! SKELETON: typed server configuration, to be written.
