//! kvtier-offload (under construction).
