//! kvtier service library (under construction).
