//! kvtier-index (under construction).
