//! kvtier-compress (under construction).
